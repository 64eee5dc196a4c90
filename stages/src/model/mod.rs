//! The EH-MAM model on candle: configuration, parameters and initialisation, building blocks,
//! the forward pass, the losses and the optimiser (method §1–§3, §7).

pub mod config;
pub mod forward;
pub mod fused;
pub mod init;
pub mod losses;
pub mod ops;
pub mod optim;

pub use config::*;
pub use forward::*;
pub use init::*;
pub use ops::*;
