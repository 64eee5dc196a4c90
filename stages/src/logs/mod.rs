//! The run's Arrow logs: the table writer (parts, rotation, resume) and the `log.frames` and
//! `log.steps` stages; and `log.tensorboard`, the step records as TensorBoard event files.

pub mod frames;
pub mod steps;
pub mod table;
pub mod tensorboard;

pub use table::*;
