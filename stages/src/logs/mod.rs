//! The run's Arrow logs: the table writer (parts, rotation, resume) and the `log.frames` and
//! `log.steps` stages.

pub mod frames;
pub mod steps;
pub mod table;

pub use table::*;
