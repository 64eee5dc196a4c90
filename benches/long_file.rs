// Peak memory of the prep on one long recording: a synthetic 1 h, 16 kHz, 16-bit mono FLAC
// through `audio.decode` (rows of `max_segment_seconds`, default 40 s) and `shards.write`
// (default 64 MB shards), with one and with two decoding workers. Memory is bounded by the shard
// size, not by the file's length: compare `-- 15 16000 40 8` with `-- 60 16000 40 8`.
//
//   cargo bench --bench long_file                  # 1 h
//   cargo bench --bench long_file -- MINUTES [RATE] [MAX_SEGMENT_SECONDS] [TARGET_MB]
//   cargo test --bench long_file -- MINUTES        # the same in the dev profile (no release build)
//
// Peak RSS is the VmHWM (Linux) of a fresh process per run (the FLAC written first, once per run);
// the FLAC is written in blocks (verbatim subframes, no encoder needed), never held whole.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// CRC-8 (x^8 + x^2 + x + 1) of a FLAC frame header.
fn crc8(data: &[u8]) -> u8 {
    let mut c = 0u8;
    for &b in data {
        c ^= b;
        for _ in 0..8 {
            c = if c & 0x80 != 0 {
                (c << 1) ^ 0x07
            } else {
                c << 1
            };
        }
    }
    c
}

/// CRC-16 (x^16 + x^15 + x^2 + 1) of a FLAC frame.
fn crc16(data: &[u8]) -> u16 {
    let mut c = 0u16;
    for &b in data {
        c ^= (b as u16) << 8;
        for _ in 0..8 {
            c = if c & 0x8000 != 0 {
                (c << 1) ^ 0x8005
            } else {
                c << 1
            };
        }
    }
    c
}

/// FLAC's UTF-8-like coding of a frame number.
fn utf8_number(n: u64, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
        return;
    }
    let mut bytes = 2;
    while n >= 1u64 << (5 * bytes + 1) {
        bytes += 1;
    }
    let lead = (0xFFu16 << (8 - bytes)) as u8 | (n >> (6 * (bytes - 1))) as u8;
    out.push(lead);
    for i in (0..bytes - 1).rev() {
        out.push(0x80 | ((n >> (6 * i)) & 0x3F) as u8);
    }
}

/// Writes a mono 16-bit FLAC of `total` samples of noise and a tone, 4096-sample frames.
fn write_flac(path: &Path, rate: u32, total: u64) {
    const BLOCK: u64 = 4096;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).expect("create FLAC"));
    let mut head = b"fLaC".to_vec();
    head.extend_from_slice(&[0x80, 0, 0, 34]); // last metadata block: STREAMINFO, 34 bytes
    head.extend_from_slice(&(BLOCK as u16).to_be_bytes());
    head.extend_from_slice(&(BLOCK as u16).to_be_bytes());
    head.extend_from_slice(&[0; 6]); // frame sizes unknown
                                     // rate (20 bits), channels − 1 (3), bits − 1 (5), total samples (36).
    let packed: u64 = ((rate as u64) << 44) | (15u64 << 36) | total;
    head.extend_from_slice(&packed.to_be_bytes());
    head.extend_from_slice(&[0; 16]); // MD5 unknown
    w.write_all(&head).expect("write FLAC");
    let mut x = 0x1234_5678u32;
    let mut frame = Vec::new();
    let mut i = 0u64;
    let mut n = 0u64;
    while i < total {
        let len = BLOCK.min(total - i);
        frame.clear();
        frame.extend_from_slice(&[0xFF, 0xF8]);
        let size_code = if len == BLOCK { 0b1100 } else { 0b0111 };
        frame.push((size_code << 4) as u8); // sample rate from STREAMINFO
        frame.push(0b0000_1000); // mono, 16 bits
        utf8_number(n, &mut frame);
        if len != BLOCK {
            frame.extend_from_slice(&((len - 1) as u16).to_be_bytes());
        }
        let c = crc8(&frame);
        frame.push(c);
        frame.push(0b0000_0010); // verbatim subframe
        for k in 0..len {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (x >> 20) as f32 / 4096.0 - 0.5;
            let t = (i + k) as f32 / rate as f32;
            let v = noise * 0.2 + (t * 2.0 * std::f32::consts::PI * 220.0).sin() * 0.4;
            frame.extend_from_slice(&((v * 32767.0) as i16).to_be_bytes());
        }
        let c = crc16(&frame);
        frame.extend_from_slice(&c.to_be_bytes());
        w.write_all(&frame).expect("write FLAC");
        i += len;
        n += 1;
    }
    w.flush().expect("write FLAC");
}

/// The process's peak and current resident memory in MB (VmHWM, VmRSS).
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn prep(input: &Path, out: &Path, workers: usize, max_seg: f64, target_mb: f64) -> (u64, f64, f64) {
    let _ = std::fs::remove_dir_all(out);
    let yaml = format!(
        "name: long
run_dir: {}
stages:
  decode: {{ kind: audio.decode, workers: {workers}, with: {{ input: {}, layout: dir, sample_rate: 16000, max_segment_seconds: {max_seg} }} }}
  shards: {{ kind: shards.write, from: decode, with: {{ dir: {}, target_mb: {target_mb} }} }}
",
        out.join("run").display(),
        input.display(),
        out.join("shards").display()
    );
    let spec = pipeline::load_str(&yaml, "long.yaml", &[]).expect("bench spec");
    let plan = pipeline::validate(spec, &stages::registry()).expect("bench plan");
    // Reset the peak (Linux: "5" clears VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t0 = Instant::now();
    pipeline::run(
        plan,
        &pipeline::RunOptions {
            force: true,
            quiet: true,
        },
        &pipeline::CancelToken::new(),
    )
    .expect("bench run");
    let wall = t0.elapsed().as_secs_f64();
    let index = stages::data::shards::ShardIndex::load(&out.join("shards"))
        .expect("index")
        .expect("index present");
    let rows = index.shards.iter().map(|s| s.rows).sum();
    (rows, wall, rss_mb().0)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let minutes: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(60.0);
    let rate: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16000);
    let max_seg: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(40.0);
    let target_mb: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(64.0);
    let tmp = tempfile::tempdir().expect("temporary directory");
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).expect("input directory");
    let flac = input.join("long.flac");
    let total = (minutes * 60.0 * rate as f64) as u64;
    write_flac(&flac, rate, total);
    let bytes = std::fs::metadata(&flac).map(|m| m.len()).unwrap_or(0);
    let samples_mb = total as f64 * 4.0 / 1e6;
    println!(
        "input: {minutes} min at {rate} Hz mono FLAC, {:.0} MB on disk, {samples_mb:.0} MB as f32 samples; rows of {max_seg} s at 16 kHz, {target_mb} MB shards",
        bytes as f64 / 1e6
    );
    if let Ok(w) = std::env::var("LONG_FILE_WORKERS") {
        // A child: one run in a fresh process, so that its peak is its own.
        let workers: usize = w.parse().unwrap_or(1);
        let (rows, wall, peak) = prep(&input, &tmp.path().join("out"), workers, max_seg, target_mb);
        println!("| {workers} | {rows} | {wall:.1} | {peak:.0} |");
        return;
    }
    println!("| workers | rows | wall s | peak RSS MB |");
    println!("| --- | --- | --- | --- |");
    for workers in [1, 2] {
        let exe = std::env::current_exe().expect("the bench executable");
        let out = std::process::Command::new(exe)
            .args(&args)
            .env("LONG_FILE_WORKERS", workers.to_string())
            .output()
            .expect("run the bench once");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.starts_with("| ")) {
            println!("{line}");
        }
    }
}
