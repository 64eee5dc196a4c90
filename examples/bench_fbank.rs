// The fbank benchmark, built in the test profile: cargo run --example bench_fbank
include!("../benches/fbank.rs");
