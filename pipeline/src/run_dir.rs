//! Run directories: the resolved spec saved there and compared with the next run's (what
//! changed, what may change and continue), moving an earlier run aside, and `run.json`, the
//! run's status.

use crate::atomic::write_atomic;
use crate::error::RunError;
use crate::lock::{lock_dir, lock_dir_shared, lock_dirs, DirLock, LOCK_FILE};
use crate::plan::Plan;
use std::path::{Path, PathBuf};

/// Saves the resolved spec in the run directory (which `lock` holds); refuses a different one
/// unless `force`, and a directory that holds files but no run whatever `force`.
pub(crate) fn prepare_run_dir(
    plan: &Plan,
    force: bool,
    quiet: bool,
    lock: &mut DirLock,
) -> Result<PathBuf, RunError> {
    let dir = plan.spec.run_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| RunError::Io {
        context: format!("cannot create run directory {}", dir.display()),
        cause: e,
    })?;
    // (`lock_plan` refused a directory that is not a run before it made anything there.)
    let text = serde_yaml::to_string(&plan.spec.resolved)
        .map_err(|e| RunError::Other(format!("cannot serialise the spec: {e}")))?;
    let path = dir.join("spec.yaml");
    {
        let mut changed = saved_spec_changes(&dir, &plan.spec.resolved);
        // Continuable parameters (a trainer's max_steps) continue the run; said, not refused.
        let cont = continuable(plan);
        let continued: Vec<String> = changed
            .iter()
            .filter(|c| cont.contains(c))
            .cloned()
            .collect();
        changed.retain(|c| !cont.contains(c));
        if changed.is_empty() && !continued.is_empty() && !quiet {
            eprintln!(
                "{}: continuing the run there with a changed {}",
                dir.display(),
                continued.join(", ")
            );
        }
        if !changed.is_empty() && force {
            // Validation may have read the earlier run (a checkpoint to resume from): a caller
            // that forces claims the directory (`claim_run_dir`) and validates again before
            // running. Here only when another process put a run there in between.
            check_movable(plan, &dir)?;
            move_aside(&dir, &changed)?;
            *lock = lock_dir(&dir, &lock_what(plan))?;
        }
        if !changed.is_empty() && !force {
            let shown: Vec<&str> = changed.iter().take(5).map(String::as_str).collect();
            let more = if changed.len() > 5 {
                format!(" and {} more", changed.len() - 5)
            } else {
                String::new()
            };
            return Err(RunError::Other(format!(
                "{} holds a run of a different spec ({}; changed: {}{more}); use another `name`/`run_dir`, or pass --force to move it aside and start afresh",
                dir.display(),
                path.display(),
                shown.join(", ")
            )));
        }
    }
    write_atomic(&path, text.as_bytes()).map_err(|e| RunError::Io {
        context: format!("cannot write {}", path.display()),
        cause: e,
    })?;
    Ok(dir)
}

/// The spec paths whose change continues a run instead of making it another one
/// (`stages.NAME.with.max_steps`).
fn continuable(plan: &Plan) -> Vec<String> {
    plan.nodes
        .iter()
        .flat_map(|n| {
            n.continuable
                .iter()
                .map(move |p| format!("stages.{}.with.{p}", n.id))
        })
        .collect()
}

/// What a run's lock file says it does.
pub(crate) fn lock_what(plan: &Plan) -> String {
    format!("run `{}`", plan.spec.name)
}

/// Every directory a plan writes, each with what the lock file says: the run directory first,
/// then the stores its stages write.
pub fn plan_writes(plan: &Plan) -> Vec<(PathBuf, String)> {
    let mut out = vec![(plan.spec.run_dir.clone(), lock_what(plan))];
    for n in &plan.nodes {
        for w in n.configured.paths().writes {
            let what = format!("stage `{}` ({}) of run `{}`", n.id, n.kind, plan.spec.name);
            out.push((w, what));
        }
    }
    out
}

/// Locks every directory a plan writes (the run directory first); refused at once, naming the
/// holder, when another process holds any of them.
pub fn lock_plan(plan: &Plan) -> Result<Vec<DirLock>, RunError> {
    // Checked before the lock file is made: a directory that is not a run gets nothing of ours.
    refuse_non_run(&plan.spec.run_dir)?;
    // A store on object storage has no lock file (no local directory): its writers commit
    // with conditional puts instead (see `storage`).
    let mut dirs = plan_writes(plan);
    dirs.retain(|(d, _)| !crate::storage::is_remote(d));
    let mut locks = lock_dirs(dirs.iter().map(|(d, w)| (d.as_path(), w.clone())))?;
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let written: Vec<PathBuf> = dirs.iter().map(|(d, _)| canon(d)).collect();
    for n in &plan.nodes {
        for store in n.configured.paths().stores {
            // A store this run also writes is already held (exclusively).
            if written.contains(&canon(&store)) || crate::storage::is_remote(&store) {
                continue;
            }
            locks.extend(lock_dir_shared(&store)?);
        }
    }
    Ok(locks)
}

/// The names in `dir` other than the lock file, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != LOCK_FILE)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `rank-N` (N > 0): a data-parallel rank's run directory inside rank 0's.
fn is_rank_dir_name(name: &str) -> bool {
    name.strip_prefix("rank-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n != "0")
}

/// Whether `dir` holds a run (its `spec.yaml` or `run.json`).
fn is_run_dir(dir: &Path) -> bool {
    dir.join("spec.yaml").is_file() || dir.join("run.json").is_file()
}

/// A directory that holds files but no run (no `spec.yaml`, no `run.json`) is never run into,
/// nor moved aside: it may be anything (a corpus, a home directory).
fn refuse_non_run(dir: &Path) -> Result<(), RunError> {
    // `rank-N`: the directory another rank of a data-parallel run made inside this run's
    // directory, possibly before this rank (rank 0) wrote its spec.yaml.
    let names: Vec<String> = entries(dir)
        .into_iter()
        .filter(|n| !is_rank_dir_name(n))
        .collect();
    if names.is_empty() || is_run_dir(dir) {
        return Ok(());
    }
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > 5 {
        format!(" and {} more", names.len() - 5)
    } else {
        String::new()
    };
    Err(RunError::Other(format!(
        "{} is not a run directory (no spec.yaml or run.json) but holds files ({}{more}); ehmam neither runs into it nor moves it (not even with --force): set `run_dir` to a new or empty directory",
        dir.display(),
        shown.join(", ")
    )))
}

/// `--force` may move `dir` aside only if it is a run directory, holds nothing the plan reads
/// (a shard directory or feature store inside it), and is not the current directory or above it.
fn check_movable(plan: &Plan, dir: &Path) -> Result<(), RunError> {
    refuse_non_run(dir)?;
    let canon = dir.canonicalize().map_err(|e| RunError::Io {
        context: format!("cannot resolve {}", dir.display()),
        cause: e,
    })?;
    if let Ok(cwd) = std::env::current_dir().and_then(|c| c.canonicalize()) {
        if cwd.starts_with(&canon) {
            return Err(RunError::Other(format!(
                "--force cannot move {} aside: it is the current directory or holds it; name a run directory below it (e.g. runs/{})",
                dir.display(),
                plan.spec.name
            )));
        }
    }
    for n in &plan.nodes {
        for r in n.configured.paths().reads {
            let Ok(rc) = r.canonicalize() else { continue };
            if rc.starts_with(&canon) {
                return Err(RunError::Other(format!(
                    "--force cannot move {} aside: stage `{}` of this spec reads {} inside it; move the run yourself or give the spec another run_dir",
                    dir.display(),
                    n.id,
                    r.display()
                )));
            }
        }
    }
    Ok(())
}

/// What differs between the spec saved in `dir` (if any) and `resolved`.
fn saved_spec_changes(dir: &Path, resolved: &serde_yaml::Value) -> Vec<String> {
    match std::fs::read_to_string(dir.join("spec.yaml")) {
        Err(_) => Vec::new(),
        Ok(old) => match serde_yaml::from_str::<serde_yaml::Value>(&old) {
            Ok(old) => run_spec_changes(&old, resolved),
            Err(_) => vec!["(the saved spec.yaml is not YAML)".to_string()],
        },
    }
}

/// Moves an earlier run out of the way (`DIR.replaced-N` beside it), whole: nothing is deleted.
fn move_aside(dir: &Path, changed: &[String]) -> Result<PathBuf, RunError> {
    let canon = dir.canonicalize().map_err(|e| RunError::Io {
        context: format!("cannot resolve {}", dir.display()),
        cause: e,
    })?;
    let (Some(parent), Some(name)) = (canon.parent(), canon.file_name()) else {
        return Err(RunError::Other(format!(
            "--force cannot move {} aside: it has no parent directory",
            dir.display()
        )));
    };
    let name = name.to_string_lossy();
    let aside = (1..)
        .map(|k| parent.join(format!("{name}.replaced-{k}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| parent.join(format!("{name}.replaced")));
    std::fs::rename(&canon, &aside).map_err(|e| RunError::Io {
        context: format!(
            "cannot move the earlier run {} aside to {}",
            dir.display(),
            aside.display()
        ),
        cause: e,
    })?;
    eprintln!(
        "--force: {} held a run of a different spec (changed: {}); moved it to {}",
        dir.display(),
        changed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        aside.display()
    );
    Ok(aside)
}

/// `--force`, after the new spec validated and before it runs: when the run directory holds a
/// run of a different spec, moves that run aside (`RUN_DIR.replaced-N`) so that the new one
/// starts afresh; the caller validates again (validation may have read the old run's
/// checkpoints). Never while another process holds the directory, never a directory that is not
/// a run, the current directory, or one holding what the spec reads. Returns where it went.
pub fn claim_run_dir(plan: &Plan) -> Result<Option<PathBuf>, RunError> {
    let dir = &plan.spec.run_dir;
    if !dir.exists() {
        return Ok(None);
    }
    refuse_non_run(dir)?;
    let lock = lock_dir(dir, &lock_what(plan))?;
    let changed = saved_spec_changes(dir, &plan.spec.resolved);
    let cont = continuable(plan);
    if changed.iter().all(|c| cont.contains(c)) {
        return Ok(None);
    }
    check_movable(plan, dir)?;
    let aside = move_aside(dir, &changed)?;
    drop(lock);
    Ok(Some(aside))
}

/// What differs between the spec saved in a run directory and the one about to run there:
/// [`spec_diff`] without the top-level `run_dir` (the same directory may be named differently,
/// `runs/x` or `./runs/x`).
pub fn run_spec_changes(old: &serde_yaml::Value, new: &serde_yaml::Value) -> Vec<String> {
    let strip = |v: &serde_yaml::Value| {
        let mut v = v.clone();
        if let serde_yaml::Value::Mapping(m) = &mut v {
            m.remove("run_dir");
        }
        v
    };
    let mut changed = Vec::new();
    spec_diff(&strip(old), &strip(new), "", &mut changed);
    changed
}

/// The paths at which two resolved specs differ. Mappings compare key by key whatever their
/// order; numbers compare by value (`1` equals `1.0`).
pub fn spec_diff(
    old: &serde_yaml::Value,
    new: &serde_yaml::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_yaml::Value;
    let at = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    let here = || {
        if path.is_empty() {
            "(the whole spec)".to_string()
        } else {
            path.to_string()
        }
    };
    match (old, new) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            let key = |k: &Value| {
                k.as_str().map(str::to_string).unwrap_or_else(|| {
                    serde_yaml::to_string(k)
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
            };
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => spec_diff(va, vb, &at(&key(k)), out),
                    None => out.push(at(&key(k))),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(at(&key(k)));
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                spec_diff(va, vb, &at(&i.to_string()), out);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let same = match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => a.as_f64() == b.as_f64(),
            };
            if !same {
                out.push(here());
            }
        }
        (Value::Tagged(a), Value::Tagged(b)) if a.tag == b.tag => {
            spec_diff(&a.value, &b.value, path, out)
        }
        (a, b) => {
            if a != b {
                out.push(here());
            }
        }
    }
}

/// `run.json` in a run directory: whether the run finished, and its wall time over all attempts.
/// Written as `running` when an attempt starts and replaced (atomically) when it ends, so a run
/// that crashed or was stopped never reads as complete.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunStatus {
    /// `running`, `complete`, `failed` or `interrupted`.
    pub status: String,
    /// Wall time of every attempt so far, in seconds.
    pub wall_s: f64,
    pub attempts: u64,
    /// The error of a failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunStatus {
    pub fn read(run_dir: &Path) -> Option<RunStatus> {
        let text = std::fs::read_to_string(run_dir.join("run.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
    pub fn is_complete(&self) -> bool {
        self.status == "complete"
    }
    pub(crate) fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&run_dir.join("run.json"), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_directory_alone_does_not_make_a_run_directory_foreign() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir(d.join("rank-1")).unwrap();
        std::fs::create_dir(d.join("rank-12")).unwrap();
        assert!(refuse_non_run(d).is_ok());
        // rank-0 is no rank's directory, and anything else still makes the directory foreign.
        std::fs::create_dir(d.join("rank-0")).unwrap();
        let e = refuse_non_run(d).unwrap_err().to_string();
        assert!(e.contains("rank-0") && !e.contains("rank-1"), "{e}");
        std::fs::remove_dir(d.join("rank-0")).unwrap();
        std::fs::write(d.join("rank-x"), b"").unwrap();
        assert!(refuse_non_run(d).is_err());
    }
}
