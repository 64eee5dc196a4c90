//! Cancelling a run from anywhere (a failing stage, Ctrl-C): every blocking wait wakes up.

use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Cancels a run from anywhere (a failing stage, Ctrl-C); every blocking wait wakes up.
#[derive(Clone)]
pub struct CancelToken(Arc<CancelInner>);

struct CancelInner {
    flag: AtomicBool,
    interrupted: AtomicBool,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    pub fn new() -> Self {
        let (tx, rx) = bounded(0);
        CancelToken(Arc::new(CancelInner {
            flag: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            rx,
        }))
    }
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        if let Ok(mut tx) = self.0.tx.lock() {
            tx.take();
        }
    }
    /// Cancels because the user asked to stop (Ctrl-C).
    pub fn interrupt(&self) {
        self.0.interrupted.store(true, Ordering::SeqCst);
        self.cancel();
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }
    pub fn was_interrupted(&self) -> bool {
        self.0.interrupted.load(Ordering::SeqCst)
    }
    pub(crate) fn rx(&self) -> &Receiver<()> {
        &self.0.rx
    }
}
