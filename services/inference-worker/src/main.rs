use std::process::ExitCode;

fn main() -> ExitCode {
    triage_runtime::service::main(inference_worker::SERVICE, inference_worker::run)
}
