use std::process::ExitCode;

fn main() -> ExitCode {
    triage_runtime::service::main(lag_autoscaler::SERVICE, lag_autoscaler::run)
}
