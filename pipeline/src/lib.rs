//! The ehmam engine: YAML specs, validation into a plan, the stage contract and registry, links
//! between stages, running a plan on threads and bounded channels, cancellation, run
//! directories, telemetry and progress.
//!
//! It knows nothing of speech: stages live in the `stages` crate and register here.
//!
//! Modules depend one way: `spec`, `params`, `error`, `atomic`, `lock`, `cancel`, `telemetry`,
//! `progress` at the bottom; `io` (ports, channels, ordering) over them; `links` and `stage`
//! (the contract) over `io`; `plan` (validation and the link step) over `stage`; `run_dir`
//! over `plan`; `runtime` (thread wiring) on top.

pub mod atomic;
pub mod cancel;
pub mod error;
pub mod io;
pub mod links;
pub mod lock;
pub mod params;
pub mod plan;
pub mod progress;
pub mod run_dir;
pub mod runtime;
pub mod spec;
pub mod stage;
pub mod storage;
pub mod telemetry;

pub use cancel::CancelToken;
pub use error::{RunError, SpecError, SpecErrors, StageError};
pub use io::{Port, StageIo};
pub use links::{AlreadyProvided, Link, LinkInfo, Linker, Links};
pub use lock::{lock_dir, DirLock, LockError};
pub use params::{parse_params, NoParams, ParamDoc, ParamError, Params};
pub use plan::{validate, Plan};
pub use progress::Progress;
pub use run_dir::{claim_run_dir, lock_plan, run_spec_changes, spec_diff, RunStatus};
pub use runtime::{run, RunOptions, RunSummary};
pub use spec::{load, load_str, Spec};
pub use stage::{
    kind, Configured, Graph, Registry, Stage, StageContext, StageDef, StageKind, StagePaths,
};
pub use telemetry::StageReport;

/// Re-exported so stage crates derive parameters with the same versions.
pub use schemars;
pub use serde_yaml;
