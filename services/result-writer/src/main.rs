use std::process::ExitCode;

fn main() -> ExitCode {
    triage_runtime::service::main(result_writer::SERVICE, result_writer::run)
}
