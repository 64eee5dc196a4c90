//! Data-parallel training over MPI (`--features mpi`; scripts/test.sh runs these as its second
//! invocation after scripts/install-mpi.sh): `mpirun -np 2` of the binary against one process.
#![cfg(feature = "mpi")]

mod common;

use common::{ok_all, query_csv, root, text};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tiny run on the demo shards whose batches are single utterances (one per buffer, none
/// cropped or dropped): rank r's k-th batch is then utterance 2k + r of the epoch's order, the
/// batch a single process with `update_freq: 2` takes as the second half of update k.
fn spec(dir: &Path) -> PathBuf {
    let shards = common::demo_shards();
    let text = format!(
        r#"name: dp
seed: 11
device: cpu
model:
  preset: tiny
  encoder: {{ layers: 2, top_k: 2 }}
stages:
  shards: {{ kind: shards.read, with: {{ dir: "{}", epochs: 4, shuffle: true }} }}
  fbank: {{ kind: features.fbank, from: shards, with: {{ num_mel_bins: 80, stack: 2 }} }}
  batch: {{ kind: batch.by_duration, from: fbank, with: {{ buffer: 1, max_seconds: 60, min_utt_seconds: 0, max_utt_seconds: 60 }} }}
  teacher: {{ kind: teacher, from: batch }}
  mask: {{ kind: mask.easy_to_hard, from: teacher, with: {{ mask_prob: 0.5, span: 5 }} }}
  student: {{ kind: student, from: mask, with: {{ max_steps: 10, schedule_steps: 10, checkpoint_every: 5, lr: 0.002, warmup_steps: 2 }} }}
  steps: {{ kind: log.steps, from: student.steps }}
"#,
        shards.display()
    );
    let p = dir.join("dp.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `mpirun -np N ehmam ARGS` (root allowed, one thread per rank), started in the repository.
fn mpirun(np: usize, args: &[String]) -> Child {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_ehmam"))
    .args(args)
    .current_dir(root())
    .env("CI", "true")
    .env("RAYON_NUM_THREADS", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c.spawn()
        .expect("cannot start mpirun (scripts/install-mpi.sh installs Open MPI)")
}

/// Waits for `child` at most `limit`; a run still going then is killed and the test fails.
fn finish(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "mpirun still running after {limit:?} (a hang):\n{}",
                text(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_args(spec: &Path, run: &Path, set: &[&str]) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        spec.display().to_string(),
        "--set".into(),
        format!("run_dir={}", run.display()),
    ];
    for s in set {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

fn checkpoint(run: &Path) -> (stages::train::CheckpointMeta, BTreeMap<String, Vec<f32>>) {
    let (meta, path) = stages::train::latest_checkpoint(run)
        .unwrap()
        .expect("a checkpoint");
    let t = stages::train::load_tensors(&path, &stages::candle_core::Device::Cpu).unwrap();
    (
        meta,
        t.into_iter()
            .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect(),
    )
}

/// ‖a − b‖ / ‖b‖ of every tensor (student, teacher, Adam's moments) ≤ `tol`.
fn assert_close(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, tol: f64) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in a {
        let y = &b[k];
        let (mut d, mut n) = (0f64, 0f64);
        for (p, q) in x.iter().zip(y) {
            d += (*p as f64 - *q as f64).powi(2);
            n += (*q as f64).powi(2);
        }
        let rel = d.sqrt() / n.sqrt().max(1e-30);
        assert!(rel <= tol, "{k}: relative difference {rel:e} > {tol:e}");
    }
}

#[test]
fn two_ranks_train_as_one_process_with_update_freq_2() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok_all(&run_args(
        &spec,
        &one,
        &["stages.student.with.update_freq=2"],
    ));
    let o = finish(
        mpirun(2, &run_args(&spec, &two, &[])),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "mpirun failed:\n{}", text(&o));
    let (ma, ta) = checkpoint(&one);
    let (mb, tb) = checkpoint(&two);
    assert_eq!((ma.step, mb.step), (10, 10));
    assert_close(&tb, &ta, 1e-6);
    // Rank 0 wrote the run's log; its figures are those of all ranks' batches (the health
    // metrics summed in f32 with the gradients: 1e-5).
    let sql = "SELECT step, loss, utterances, frames, loss_rec, loss_aux, target_std, pred_std, rank_agreement, teacher_rank_agreement FROM steps ORDER BY step";
    let (la, lb) = (query_csv(&[&one], sql), query_csv(&[&two], sql));
    assert_eq!(la.len(), 10);
    assert_eq!(lb.len(), 10);
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x[0], y[0]);
        let (p, q): (f64, f64) = (x[1].parse().unwrap(), y[1].parse().unwrap());
        assert!(
            (p - q).abs() <= 1e-6 * q.abs(),
            "step {}: loss {p} vs {q}",
            x[0]
        );
        assert_eq!((&x[2], &x[3]), (&y[2], &y[3]), "step {}", x[0]);
        for c in 4..10 {
            let (p, q): (f64, f64) = (x[c].parse().unwrap(), y[c].parse().unwrap());
            assert!(
                (p - q).abs() <= 1e-5 * q.abs().max(1e-3),
                "step {} column {c}: {p} vs {q}",
                x[0]
            );
        }
    }
    // Each rank's data position is in the checkpoint; rank 1 ran in its own directory.
    let ranks = mb.ranks.expect("the ranks' positions");
    assert_eq!(ranks.len(), 2);
    assert!(
        ranks.iter().all(|p| p.is_some_and(|p| p.step == 9)),
        "{ranks:?}"
    );
    assert!(two.join("rank-1").join("run.json").exists());
    assert!(!two.join("rank-1").join("checkpoints").exists());
}

#[test]
fn a_stopped_two_rank_run_resumes_exactly_on_two_ranks_only() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = finish(
        mpirun(2, &run_args(&spec, &a, &[])),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", text(&o));
    // b: 5 updates, then on to 10 from its checkpoint.
    let o = finish(
        mpirun(
            2,
            &run_args(&spec, &b, &["stages.student.with.max_steps=5"]),
        ),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(checkpoint(&b).0.step, 5);
    // One process cannot continue a checkpoint of two ranks (each rank's place in the data).
    let one = common::ehmam(
        &run_args(&spec, &b, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!one.status.success());
    assert!(text(&one).contains("written by 2 ranks"), "{}", text(&one));
    let o = finish(
        mpirun(2, &run_args(&spec, &b, &[])),
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    let ((ma, ta), (mb, tb)) = (checkpoint(&a), checkpoint(&b));
    assert_eq!((ma.step, mb.step), (10, 10));
    assert_close(&tb, &ta, 1e-6);
}

#[test]
fn ranks_with_different_specs_refuse_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let run = tmp.path().join("r");
    let exe = env!("CARGO_BIN_EXE_ehmam").to_string();
    let mut args = vec![
        "--oversubscribe".to_string(),
        "-np".into(),
        "1".into(),
        exe.clone(),
    ];
    args.extend(run_args(&spec, &run, &[]));
    args.extend([":".into(), "-np".into(), "1".into(), exe]);
    args.extend(run_args(&spec, &run, &["stages.student.with.lr=0.003"]));
    let child = Command::new("mpirun")
        .args(&args)
        .current_dir(root())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = finish(child, Duration::from_secs(120));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("the ranks run different specs") && t.contains("rank 1 differs from rank 0"),
        "{t}"
    );
    assert!(!run.join("steps").exists() && !run.join("checkpoints").exists());
}

#[test]
fn a_world_size_the_launcher_does_not_give_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let run = tmp.path().join("r");
    let o = common::ehmam(
        &run_args(&spec, &run, &["distributed.world_size=2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("asks for 2 ranks but MPI sees 1 process"),
        "{}",
        text(&o)
    );
}

/// The pid of rank `rank` of a run started with `marker` in its arguments.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(marker)
            || !String::from_utf8_lossy(&cmd).starts_with(env!("CARGO_BIN_EXE_ehmam"))
        {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts a long two-rank run, waits until it trains, and sends `signal` to rank 1.
fn signal_rank_1(signal: &str) -> (Output, Duration) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let run = tmp.path().join(format!("sig-{signal}"));
    let child = mpirun(
        2,
        &run_args(
            &spec,
            &run,
            &[
                "stages.student.with.max_steps=100000",
                "stages.shards.with.epochs=1000",
                "distributed.timeout_s=3",
            ],
        ),
    );
    let marker = run.display().to_string();
    let t0 = Instant::now();
    let pid = loop {
        // Training has started once rank 1 has a run directory and rank 0 logged steps.
        if let Some(p) = rank_pid(&marker, 1) {
            if run.join("rank-1").join("run.json").exists() {
                std::thread::sleep(Duration::from_secs(2));
                break p;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let sent = Instant::now();
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = finish(child, Duration::from_secs(60));
    let took = sent.elapsed();
    // A stopped process outlives mpirun: end it.
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    (o, took)
}

#[test]
fn a_stuck_rank_is_named_after_the_timeout_and_the_run_stops() {
    let (o, took) = signal_rank_1("STOP");
    assert!(!o.status.success());
    let t = text(&o);
    // Rank 0 waits for rank 1 at the next update's exchange, or (stopped in between) in the
    // gradient all-reduce; either way it names rank 1.
    assert!(
        t.contains("error: rank 0: stage `student` (student) failed: rank 1 did not reach update")
            || t.contains("error: rank 0: update")
                && t.contains("all-reduce with rank 1 did not finish"),
        "{t}"
    );
    assert!(t.contains("within 3 s"), "{t}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn a_killed_rank_stops_the_others() {
    let (o, took) = signal_rank_1("KILL");
    assert!(!o.status.success());
    let t = text(&o);
    // Open MPI's launcher names the rank and ends the others.
    assert!(t.contains("rank 1"), "{t}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}
