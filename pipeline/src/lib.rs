//! The ehmam engine: YAML specs, validation into a plan, the stage contract and registry, running a
//! plan on threads and bounded channels, cancellation, telemetry and progress.
//!
//! It knows nothing of speech: stages live in the `stages` crate and register here.

pub mod error;
pub mod params;
pub mod plan;
pub mod progress;
pub mod runtime;
pub mod spec;
pub mod stage;
pub mod telemetry;

pub use error::{RunError, SpecError, SpecErrors, StageError};
pub use params::{parse_params, NoParams, ParamDoc, ParamError, Params};
pub use plan::{validate, Plan};
pub use progress::Progress;
pub use runtime::{run, CancelToken, RunOptions, RunStatus, RunSummary, StageIo};
pub use spec::{load, load_str, Spec};
pub use stage::{kind, Configured, Port, Registry, Shared, Stage, StageContext, StageDef, StageKind};
pub use telemetry::StageReport;

/// Re-exported so stage crates derive parameters with the same versions.
pub use schemars;
pub use serde_yaml;
