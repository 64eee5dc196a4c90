// The prep benchmark, built in the test profile: cargo run --example bench_prep
include!("../benches/prep.rs");
