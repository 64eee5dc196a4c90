//! Errors of the engine: spec errors (collected, every one reported) and run errors.

use std::fmt;

/// One problem found in a spec, located by its YAML path and, where known, its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// File the error refers to (the spec, or `--set` for an override).
    pub file: String,
    /// Dotted YAML path, e.g. `stages.mask.with.mask_prob`; empty for the whole document.
    pub path: String,
    /// 1-based line in `file`, where the parser or the line index knows it.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every error found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the spec has {n} error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// What a stage returns when it cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The run was cancelled (another stage failed, or Ctrl-C). Not an error of this stage.
    #[error("cancelled")]
    Cancelled,
    /// Every consumer of this stage's outputs has finished; the stage should stop quietly.
    #[error("downstream closed")]
    Closed,
    /// A real failure, with a message that says what and where.
    #[error("{0}")]
    Failed(String),
    /// The cause is part of the message (not a `source`), so `{:#}` chains print it once.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl StageError {
    pub fn failed(msg: impl Into<String>) -> Self {
        StageError::Failed(msg.into())
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            cause: source,
        }
    }
}

/// Errors of running a plan.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    #[error("stage `{stage}` ({kind}) failed: {message}")]
    Stage {
        stage: String,
        kind: String,
        message: String,
    },
    #[error("interrupted (Ctrl-C); every stage stopped, outputs already finished are intact")]
    Interrupted,
    /// The cause is part of the message (not a `source`), so `{:#}` chains print it once.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    /// Another process holds a directory this run writes.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
    #[error("{0}")]
    Other(String),
}
