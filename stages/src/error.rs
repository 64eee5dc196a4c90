//! The errors of the speech stages: one enum, with variants a caller can match.

use std::path::PathBuf;

/// What went wrong in a speech stage or a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input file that cannot be used (prep reports it and goes on).
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    /// A store (shards, features, logs, checkpoints) whose files do not match what its index or
    /// format says.
    #[error("{path}: {what}")]
    Damaged { path: PathBuf, what: String },
    /// Training produced non-finite values.
    #[error("update {step}: {what}")]
    Diverged { step: u64, what: String },
    /// The compute device, or a tensor operation on it.
    #[error("{context}: {cause}")]
    Device {
        context: String,
        cause: candle_core::Error,
    },
    /// A file operation, with the path it was about.
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A value that is not what it should be (a configuration, a shape, a file's contents that
    /// are well formed but not usable).
    #[error("{0}")]
    Invalid(String),
}

/// Results of the speech stages.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io {
            action,
            path,
            cause,
        }
    }
    pub fn damaged(path: impl Into<PathBuf>, what: impl std::fmt::Display) -> Error {
        Error::Damaged {
            path: path.into(),
            what: what.to_string(),
        }
    }
    pub fn device(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
        let context = context.into();
        move |cause| Error::Device { context, cause }
    }
    pub fn invalid(what: impl std::fmt::Display) -> Error {
        Error::Invalid(what.to_string())
    }
}

/// A tensor operation that failed (shapes, device memory, a kernel).
impl From<candle_core::Error> for Error {
    fn from(cause: candle_core::Error) -> Self {
        Error::Device {
            context: "tensor operation".into(),
            cause,
        }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Invalid(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::Invalid(s.to_string())
    }
}

impl From<Error> for pipeline::StageError {
    fn from(e: Error) -> Self {
        match e {
            Error::Io {
                action,
                path,
                cause,
            } => pipeline::StageError::io(format!("{action} {}", path.display()), cause),
            e => pipeline::StageError::Failed(e.to_string()),
        }
    }
}
