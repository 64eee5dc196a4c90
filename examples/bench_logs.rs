// The frame-log benchmark, built in the test profile: cargo run --example bench_logs
include!("../benches/logs.rs");
