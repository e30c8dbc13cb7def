use std::process::ExitCode;

fn main() -> ExitCode {
    triage_runtime::service::main(dlq_alerter::SERVICE, dlq_alerter::run)
}
