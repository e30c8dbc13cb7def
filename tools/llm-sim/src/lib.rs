//! llm-sim: an OpenAI-compatible LLM simulator (built in its own issue).
