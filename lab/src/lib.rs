//! What a researcher does with runs: SQL over their tables (DataFusion), plots, reports with a
//! linear probe, and running specs and sweeps of them. Depends on `pipeline` and `stages`;
//! nothing depends on it but the command line.

pub mod plot;
pub mod probe;
pub mod report;
pub mod runinfo;
pub mod runs;
pub mod sql;
pub mod sweep;
