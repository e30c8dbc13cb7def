use std::process::ExitCode;

fn main() -> ExitCode {
    triage_runtime::service::main(ticket_publisher::SERVICE, ticket_publisher::run)
}
