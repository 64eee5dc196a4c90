//! What the `teacher` and `student` stages share: the versioned weight cell through which the
//! student publishes new EMA teacher weights (architecture: "a shared, versioned cell"), devices,
//! the model block's validation, and checkpoints (safetensors plus a JSON sidecar).

use crate::model::Weights;
use pipeline::StageError;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Teacher weights of one version: the EMA'd teacher parameters (method §3) plus the student's
/// current front-end (the teacher reads the student's front-end output, §1.2).
pub struct TeacherWeights {
    /// Completed student updates these weights include.
    pub version: u64,
    pub weights: Weights,
}

#[derive(Default)]
struct CellState {
    /// The last few versions, oldest first.
    history: VecDeque<Arc<TeacherWeights>>,
    /// The first version published in this run (the step the student starts or resumes at).
    first: Option<u64>,
    closed: bool,
}

/// The student → teacher channel for weights: versions in order, the last few kept so that a
/// teacher allowed to run `staleness` steps ahead still gets an exact, reproducible version.
#[derive(Default)]
pub struct WeightCell {
    state: Mutex<CellState>,
    cv: Condvar,
}

/// What a teacher waiting for weights gets.
pub enum Wait {
    Weights(Arc<TeacherWeights>),
    /// The student has finished: nothing more will come.
    Closed,
}

impl WeightCell {
    pub fn publish(&self, w: TeacherWeights) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.first.is_none() {
            s.first = Some(w.version);
        }
        s.history.push_back(Arc::new(w));
        while s.history.len() > 3 {
            s.history.pop_front();
        }
        self.cv.notify_all();
    }

    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        self.cv.notify_all();
    }

    /// The first version published (waits for it).
    pub fn first(&self, cancelled: &dyn Fn() -> bool) -> Result<Option<u64>, StageError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = s.first {
                return Ok(Some(f));
            }
            if s.closed {
                return Ok(None);
            }
            if cancelled() {
                return Err(StageError::Cancelled);
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until version `v` is published and returns it.
    pub fn wait_for(&self, v: u64, cancelled: &dyn Fn() -> bool) -> Result<Wait, StageError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(w) = s.history.iter().find(|w| w.version == v) {
                return Ok(Wait::Weights(w.clone()));
            }
            if s.history.back().is_some_and(|w| w.version > v) {
                return Err(StageError::failed(format!(
                    "internal: teacher weights of version {v} are no longer kept"
                )));
            }
            if s.closed {
                return Ok(Wait::Closed);
            }
            if cancelled() {
                return Err(StageError::Cancelled);
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Closes the cell when the student stops for any reason, so the teacher never waits forever.
pub struct CloseOnDrop(pub Arc<WeightCell>);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}
