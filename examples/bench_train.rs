// The training benchmark, built in the test profile: cargo run --example bench_train
include!("../benches/train.rs");
