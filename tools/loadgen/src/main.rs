//! loadgen: drives the ticket ingress over HTTP or gRPC and reports throughput and latency.

fn main() {}
