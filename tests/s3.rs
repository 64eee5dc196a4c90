//! Stores on object storage, against a real S3-compatible server on loopback (moto's server,
//! installed by scripts/install-s3.sh into .venv-s3 and started here on a free port): prep into
//! `s3://`, byte-identical to a local prep; training reads it; a prep killed with SIGKILL
//! resumes; partitions merge there; a server that fails requests is retried through, and one
//! that stops answering leaves nothing that reads as complete.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUCKET: &str = "ehmam-test";

/// moto's S3 server on a free loopback port, one for the whole test binary (this process's
/// environment points at it, for the checks that read the objects through `pipeline::storage`);
/// a watcher ends it when this process ends.
struct Moto {
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server with the test bucket, or `None` (test skipped, said) when it is not installed and
/// `EHMAM_REQUIRE_S3` is unset. scripts/test.sh installs it and sets that variable.
fn moto() -> Option<&'static Moto> {
    static M: std::sync::OnceLock<Option<Moto>> = std::sync::OnceLock::new();
    M.get_or_init(start_moto).as_ref()
}

fn start_moto() -> Option<Moto> {
    let bin = root().join(".venv-s3/bin/moto_server");
    if !bin.exists() {
        assert!(
            std::env::var_os("EHMAM_REQUIRE_S3").is_none(),
            "{} is missing: run scripts/install-s3.sh",
            bin.display()
        );
        eprintln!(
            "SKIPPED: no S3 server ({} missing; scripts/install-s3.sh installs it)",
            bin.display()
        );
        return None;
    }
    let port = free_port();
    let watch = format!(
        "\"$0\" -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill $m",
        std::process::id()
    );
    Command::new("sh")
        // `sh -c SCRIPT BIN`: the script's `$0` is the server's path.
        .args(["-c", &watch])
        .arg(&bin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start moto_server");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http(port, "PUT", &format!("/{BUCKET}"), b"") {
            assert!(
                r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"),
                "{r}"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "moto did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (k, v) in s3_env(port) {
        std::env::set_var(k, v);
    }
    Some(Moto { port })
}

/// One plain HTTP request (moto takes unsigned requests); the response's head and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The environment that points ehmam (object_store's S3 client) at a server on `port`.
fn s3_env(port: u16) -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP".into(), "true".into()),
    ]
}

fn ehmam_env(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ehmam"))
        .args(args)
        .current_dir(root())
        .env("CI", "true")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("cannot start ehmam")
}

fn prep_args(run: &Path, shards: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "run".into(),
        "specs/prep.yaml".into(),
        "--quiet".into(),
        "--set".into(),
        format!("run_dir={}", run.display()),
        "--set".into(),
        format!("stages.shards.with.dir={shards}"),
    ];
    for e in extra {
        v.push("--set".into());
        v.push(e.to_string());
    }
    v
}

/// `ehmam query --format csv` of run directory `url` (read where it is) and of the local run
/// directory `local`: asserts they print the same rows, at least one; returns the output.
fn query_there_and_here(url: &str, local: &Path, q: &str, env: &[(String, String)]) -> String {
    let args = |dir: String| -> Vec<String> {
        vec![
            "query".into(),
            "--format".into(),
            "csv".into(),
            dir,
            q.into(),
        ]
    };
    let there = run_ok(&args(url.to_string()), env);
    let here = run_ok(&args(local.display().to_string()), env);
    assert!(there.lines().count() > 1, "{q}: {there}");
    assert_eq!(there, here, "{q}");
    there
}

fn run_ok(args: &[String], env: &[(String, String)]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ehmam_env(&a, env);
    assert!(
        o.status.success() && !text(&o).contains("panicked"),
        "ehmam {a:?} failed:\n{}",
        text(&o)
    );
    text(&o)
}

/// The objects under `prefix` of the bucket, by key relative to it, with their bytes (read
/// with this process's client, straight from the server).
fn objects(prefix: &str) -> Vec<(String, Vec<u8>)> {
    fn walk(url: &str, rel: &str, out: &mut Vec<(String, Vec<u8>)>) {
        let (files, dirs) = pipeline::storage::list(Path::new(url)).unwrap();
        for f in files {
            let p = format!("{url}/{f}");
            let b = pipeline::storage::read(Path::new(&p)).unwrap();
            out.push((format!("{rel}{f}"), b.to_vec()));
        }
        for d in dirs {
            walk(&format!("{url}/{d}"), &format!("{rel}{d}/"), out);
        }
    }
    let mut out = Vec::new();
    walk(&format!("s3://{BUCKET}/{prefix}"), "", &mut out);
    out.sort();
    out
}

/// An object's text, `None` when there is none.
fn object_text(key: &str) -> Option<String> {
    pipeline::storage::read_opt(Path::new(&format!("s3://{BUCKET}/{key}")))
        .unwrap()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The files of a local tree as (relative path, bytes), `/`-separated.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = tree_bytes(dir)
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".lock") && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn prep_into_s3_is_byte_identical_to_a_local_prep_and_training_reads_it() {
    let Some(m) = moto() else { return };
    let env = s3_env(m.port);
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("shards");
    run_ok(
        &prep_args(
            &tmp.path().join("run-local"),
            &local.display().to_string(),
            &[],
        ),
        &env,
    );
    let url = format!("s3://{BUCKET}/demo");
    run_ok(&prep_args(&tmp.path().join("run-s3"), &url, &[]), &env);
    let remote = objects("demo");
    let here = files(&local);
    assert_eq!(
        remote.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        here.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
    );
    assert!(
        remote == here,
        "the objects are the local files, byte for byte"
    );
    // The prep's tables (in its local run directory) are those of the local prep.
    let q = "SELECT utt_id, num_samples, source FROM utterances ORDER BY utt_id";
    assert_eq!(
        query_csv(&[&tmp.path().join("run-s3")], q),
        query_csv(&[&tmp.path().join("run-local")], q)
    );
    // A prep whose run directory is on S3 too: its tables queried there (read in place) are
    // those of the local prep's run directory.
    let run_url = format!("s3://{BUCKET}/runs/prep-demo");
    run_ok(
        &prep_args(Path::new(&run_url), &format!("{url}-2"), &[]),
        &env,
    );
    for q in [
        "SELECT utt_id, speaker, num_samples, transcript FROM utterances ORDER BY utt_id",
        "SELECT count(*), sum(num_samples) FROM utterances",
        "SELECT count(*) AS rejected FROM rejects",
    ] {
        query_there_and_here(&run_url, &tmp.path().join("run-local"), q, &env);
    }

    // A few updates of the tiny model from the shards on S3, prefetching 2 ahead.
    let run = tmp.path().join("train");
    let args: Vec<String> = [
        "run",
        "specs/tiny.yaml",
        "--quiet",
        "--set",
        &format!("run_dir={}", run.display()),
        "--set",
        &format!("stages.shards.with.dir={url}"),
        "--set",
        "stages.shards.with.prefetch=2",
        "--set",
        "stages.student.with.max_steps=3",
        "--set",
        "stages.student.with.checkpoint_every=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_ok(&args, &env);
    let steps = query_csv(&[&run], "SELECT count(*), max(step) FROM steps");
    assert_eq!(steps, vec![vec!["3".to_string(), "2".to_string()]]);
}

#[test]
fn a_prep_into_s3_killed_midway_reads_as_unfinished_and_resumes_to_the_same_objects() {
    let Some(m) = moto() else { return };
    let env = s3_env(m.port);
    let tmp = tempfile::tempdir().unwrap();
    // Small shards and one worker: many commits, slow enough to be killed between them.
    let extra = [
        "stages.shards.with.target_mb=0.1",
        "stages.decode.workers=1",
    ];
    let local = tmp.path().join("shards");
    run_ok(
        &prep_args(
            &tmp.path().join("run-local"),
            &local.display().to_string(),
            &extra,
        ),
        &env,
    );
    let url = format!("s3://{BUCKET}/killed");
    let run = tmp.path().join("run-s3");
    let args = prep_args(&run, &url, &extra);
    // Killed once its index lists a few shards.
    kill_when(&args, &env, 120, || {
        object_text("killed/index.json")
            .unwrap_or_default()
            .matches("\"file\"")
            .count()
            >= 3
    });
    let idx = object_text("killed/index.json").unwrap();
    assert!(idx.contains("\"complete\": false"), "{idx}");
    // A reader refuses it (at validation, naming the store).
    let o = ehmam_env(
        &[
            "validate",
            "specs/tiny.yaml",
            "--set",
            &format!("stages.shards.with.dir={url}"),
        ],
        &env,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("has not finished"), "{}", text(&o));
    // The rerun resumes and ends with the objects a local prep writes.
    let out = run_ok(
        &prep_args(&run, &url, &extra)
            .into_iter()
            .filter(|a| a != "--quiet")
            .collect::<Vec<_>>(),
        &env,
    );
    assert!(out.contains("resuming"), "{out}");
    let remote = objects("killed");
    assert!(
        remote == files(&local),
        "resumed objects equal the local prep's files"
    );
}

#[test]
fn partitions_on_s3_merge_into_one_store() {
    let Some(m) = moto() else { return };
    let env = s3_env(m.port);
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/parts");
    for i in 0..2 {
        let part = format!("stages.decode.with.partition={{index: {i}, count: 2}}");
        run_ok(
            &prep_args(&tmp.path().join(format!("run-{i}")), &url, &[&part]),
            &env,
        );
    }
    let a: Vec<String> = vec![
        "shards".into(),
        "merge".into(),
        "--verify".into(),
        url.clone(),
    ];
    let out = run_ok(&a, &env);
    assert!(out.contains("merged: 2 partitions"), "{out}");
    // Read through the store reader of the library.
    use stages::stream::PartSource;
    let parts = stages::data::shards::Shards::parts(Path::new(&url)).unwrap();
    let merged: Vec<String> = parts
        .iter()
        .flat_map(|p| stages::data::shards::read_shard(&p.path, 0).unwrap())
        .map(|u| u.utt_id)
        .collect();
    let whole: Vec<String> = stages::data::shards::Shards::parts(demo_shards())
        .unwrap()
        .iter()
        .flat_map(|p| stages::data::shards::read_shard(&p.path, 0).unwrap())
        .map(|u| u.utt_id)
        .collect();
    assert_eq!(merged, whole);
}

/// An HTTP proxy in front of the server that fails requests: every `fail_every`-th is answered
/// 503 without reaching the server, and every `drop_every`-th reaches it but its answer is lost
/// (the connection closed): the client must retry, and a retried create must see that the
/// object it put is there. After `stop_after` requests, every request fails.
struct Flaky {
    port: u16,
    injected: Arc<AtomicUsize>,
}

fn flaky(upstream: u16, fail_every: usize, drop_every: usize, stop_after: usize) -> Flaky {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let injected = Arc::new(AtomicUsize::new(0));
    let count = Arc::new(AtomicUsize::new(0));
    let inj = injected.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let (inj, count) = (inj.clone(), count.clone());
            std::thread::spawn(move || {
                // One request per connection: answers say `Connection: close`.
                let Some(req) = read_request(&mut c) else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                if n > stop_after || n % fail_every == 0 {
                    inj.fetch_add(1, Ordering::SeqCst);
                    let _ = c.write_all(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let _ = up.write_all(&req);
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                if n % drop_every == 0 {
                    inj.fetch_add(1, Ordering::SeqCst);
                    return; // the server did it; the client never hears
                }
                let _ = c.write_all(&resp);
            });
        }
    });
    Flaky { port, injected }
}

/// Reads one HTTP request (head and Content-Length body), with `Connection: close` put in its
/// head so that the server ends the connection after answering.
fn read_request(c: &mut TcpStream) -> Option<Vec<u8>> {
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    let mut out = kept.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    out.extend_from_slice(&buf[head_end + 4..head_end + 4 + len]);
    Some(out)
}

#[test]
fn a_failing_server_is_retried_through_and_one_that_stops_leaves_nothing_complete() {
    let Some(m) = moto() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["stages.shards.with.target_mb=0.25"];
    let local = tmp.path().join("shards");
    run_ok(
        &prep_args(
            &tmp.path().join("run-local"),
            &local.display().to_string(),
            &extra,
        ),
        &s3_env(m.port),
    );

    // A quarter of the requests fail (503), one in seven is done but its answer lost.
    let f = flaky(m.port, 4, 7, usize::MAX);
    let mut env = s3_env(f.port);
    env.push(("EHMAM_STORE_RETRIES".into(), "20".into()));
    let url = format!("s3://{BUCKET}/flaky");
    run_ok(
        &prep_args(&tmp.path().join("run-flaky"), &url, &extra),
        &env,
    );
    let injected = f.injected.load(Ordering::SeqCst);
    assert!(injected >= 5, "only {injected} failures injected");
    assert!(
        objects("flaky") == files(&local),
        "after {injected} failed requests, the objects equal the local prep's files"
    );

    // A server that stops answering after 12 requests: the prep fails, saying why, and what is
    // there does not read as a finished store.
    let f = flaky(m.port, usize::MAX, usize::MAX, 12);
    let mut env = s3_env(f.port);
    env.push(("EHMAM_STORE_RETRIES".into(), "2".into()));
    let url = format!("s3://{BUCKET}/stopped");
    let args = prep_args(&tmp.path().join("run-stopped"), &url, &extra);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ehmam_env(&a, &env);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("s3://"),
        "the error names the store: {}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    let idx = object_text("stopped/index.json").unwrap_or_default();
    assert!(
        !idx.contains("\"complete\": true"),
        "no index that says complete: {idx}"
    );
}

#[test]
fn a_part_is_created_once_its_own_bytes_again_are_accepted_and_others_refused() {
    if moto().is_none() {
        return;
    }
    use pipeline::storage::{read, write_new, write_replace};
    let p = format!("s3://{BUCKET}/create/part-0");
    let p = Path::new(&p);
    write_new(p, bytes::Bytes::from_static(b"first")).unwrap();
    // The same bytes again: a retried request whose answer was lost, or a rerun.
    write_new(p, bytes::Bytes::from_static(b"first")).unwrap();
    let e = write_new(p, bytes::Bytes::from_static(b"other")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(e.to_string().contains("another writer"), "{e}");
    assert_eq!(&read(p).unwrap()[..], b"first");
    // An index is replaced whole.
    write_replace(p, bytes::Bytes::from_static(b"index 2")).unwrap();
    assert_eq!(&read(p).unwrap()[..], b"index 2");
}

fn tiny_args(run_dir: &str, shards: &str, max: u32) -> Vec<String> {
    [
        "run",
        "specs/tiny.yaml",
        "--set",
        &format!("run_dir={run_dir}"),
        "--set",
        &format!("stages.shards.with.dir={shards}"),
        "--set",
        &format!("stages.student.with.max_steps={max}"),
        "--set",
        "stages.student.with.checkpoint_every=4",
        "--set",
        "stages.batch.with.max_seconds=8",
        // Steps parts of 4 updates (and closed at each checkpoint, as every log part is).
        "--set",
        "stages.steps.with.rotate_every=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_run_directory_on_s3_is_killed_resumed_from_another_cache_and_queried_there() {
    let Some(m) = moto() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let shards = format!("s3://{BUCKET}/runshards");
    run_ok(
        &prep_args(&tmp.path().join("prep"), &shards, &[]),
        &s3_env(m.port),
    );
    // The same run, uninterrupted, in a local run directory.
    let local = tmp.path().join("local");
    run_ok(
        &tiny_args(&local.display().to_string(), &shards, 16),
        &s3_env(m.port),
    );

    let url = format!("s3://{BUCKET}/runs/tiny");
    let with_cache = |c: &str| {
        let mut env = s3_env(m.port);
        env.push((
            "EHMAM_CACHE_DIR".into(),
            tmp.path().join(c).display().to_string(),
        ));
        env.push(("EHMAM_SYNC_S".into(), "0.2".into()));
        env
    };
    // Killed once the store holds the checkpoint of update 8 and the log part of steps 4–7.
    kill_when(
        &tiny_args(&url, &shards, 16),
        &with_cache("cache-a"),
        300,
        || {
            object_text("runs/tiny/checkpoints/step-00000008.json").is_some()
                && object_text("runs/tiny/steps/part-000000004.arrow").is_some()
        },
    );
    // Resumed on "another machine": an empty cache, everything from the store.
    let out = run_ok(&tiny_args(&url, &shards, 16), &with_cache("cache-b"));
    assert!(out.contains("resum"), "{out}");
    assert!(out.contains(&url), "{out}");
    // Queried from a third empty cache: the steps of the uninterrupted run, exactly.
    let q = "SELECT step, loss, loss_rec, loss_aux FROM steps ORDER BY step";
    let there = query_there_and_here(&url, &local, q, &with_cache("cache-c"));
    assert_eq!(there.lines().count(), 17, "{there}");
    // The other tables too: frame logs (Arrow parts), the stage table (Parquet), and a join.
    // Every logged update's frames, update 0's included: the frames part open at the
    // checkpoint of update 4 was closed there (it would hold updates 0–99), so the kill after the
    // checkpoint of 8 took none of its rows.
    for q in [
        "SELECT step, count(*) AS n, sum(CAST(masked AS INT)) AS m, sum(recon_loss) AS l FROM frames GROUP BY step ORDER BY step",
        "SELECT stage, kind FROM stages ORDER BY stage",
        "SELECT s.step, s.loss, count(*) FROM steps s JOIN frames f ON s.step = f.step GROUP BY s.step, s.loss ORDER BY s.step",
    ] {
        let there = query_there_and_here(&url, &local, q, &with_cache("cache-c"));
        if q.contains("FROM frames GROUP BY") {
            assert!(there.contains("\n0,"), "update 0's frames are there: {there}");
        }
    }
    // Read where it is: DataFusion read the objects, nothing was copied into the cache.
    let cache_c = tmp.path().join("cache-c");
    assert!(
        !cache_c.join("runs").exists(),
        "a query copied the run into {}",
        cache_c.display()
    );
    // A damaged part there (not an Arrow file) is skipped with a warning that names it; the
    // rest of the table reads as before.
    let junk = "runs/tiny/steps/part-000000099.arrow";
    http(
        m.port,
        "PUT",
        &format!("/{BUCKET}/{junk}"),
        b"not an Arrow file, but long enough to look for a footer",
    )
    .unwrap();
    let q = [
        "query",
        "--format",
        "csv",
        url.as_str(),
        "SELECT count(*) AS n FROM steps",
    ];
    let o = ehmam_env(&q, &with_cache("cache-c"));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("skipping s3://{BUCKET}/{junk}")),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("n\n16\n"),
        "{out}"
    );
    // The checkpoint put last is the final one, with its tensors.
    assert!(object_text("runs/tiny/checkpoints/step-00000016.json").is_some());
    let files = objects("runs/tiny");
    assert!(files
        .iter()
        .any(|(n, _)| n == "checkpoints/step-00000016.safetensors"));
    assert!(
        !files.iter().any(|(n, _)| n.ends_with(".lock")),
        "no lock file on S3"
    );
}

#[test]
fn features_written_to_s3_are_the_local_files_and_read_back() {
    let Some(m) = moto() else { return };
    let env = s3_env(m.port);
    let tmp = tempfile::tempdir().unwrap();
    let shards = demo_shards().display().to_string();
    let feats = |run: &str, dir: &str| -> Vec<String> {
        [
            "run",
            "specs/features.yaml",
            "--quiet",
            "--set",
            &format!("run_dir={}", tmp.path().join(run).display()),
            "--set",
            &format!("stages.shards.with.dir={shards}"),
            "--set",
            &format!("stages.store.with.dir={dir}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let local = tmp.path().join("features");
    run_ok(&feats("run-local", &local.display().to_string()), &env);
    let url = format!("s3://{BUCKET}/features");
    run_ok(&feats("run-s3", &url), &env);
    assert!(
        objects("features") == files(&local),
        "the objects are the local files"
    );
    // A rerun starts the store over (features.write does not resume) and ends the same.
    run_ok(&feats("run-s3", &url), &env);
    assert!(objects("features") == files(&local));
    use stages::stream::PartSource;
    let parts = stages::data::store::FeatureStore::parts(Path::new(&url)).unwrap();
    let rows: usize = parts
        .iter()
        .map(|p| {
            stages::data::store::read_features(&p.path, Some(0))
                .unwrap()
                .len()
        })
        .sum();
    assert!(rows >= 150, "{rows}");
}
