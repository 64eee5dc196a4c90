//! What a running stage sees of the graph: its ports and their item types, the channels behind
//! them, the ordering window and relays that put the output of parallel workers back in order,
//! and the metrics a stage reports.
//!
//! Ordering protocol. A stage with `workers: N > 1` tags each output with the sequence number of
//! the unit it is working on (an input item's sequence number, or a unit claimed by a parallel
//! source) and sends `Done(seq)` once that unit is finished. A relay thread per output port puts
//! the units back in order, numbers them afresh and hands them on. Workers never run more than a
//! window of units ahead of the relay, so memory stays bounded however slow one unit is.

use crate::cancel::CancelToken;
use crate::error::StageError;
use crate::progress::Progress;
use crate::telemetry::Stats;
use crossbeam_channel::{select, Receiver, Sender};
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An item on a channel: any sendable value; ports check its type.
pub(crate) type Item = Box<dyn Any + Send>;
pub(crate) type CloneFn = fn(&Item) -> Option<Item>;

/// The Rust type carried by a port: connections are checked by `TypeId`.
#[derive(Clone, Copy)]
pub struct PortType {
    pub name: &'static str,
    pub(crate) id: TypeId,
    /// Present when items can be copied to several consumers (fan-out).
    pub(crate) clone: Option<CloneFn>,
}

impl std::fmt::Debug for PortType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    // "stages::audio::Decoded" → "Decoded"; generic arguments kept whole.
    match full.find('<') {
        Some(_) => full,
        None => full.rsplit("::").next().unwrap_or(full),
    }
}

fn clone_item<T: Clone + Send + 'static>(item: &Item) -> Option<Item> {
    item.downcast_ref::<T>()
        .map(|t| Box::new(t.clone()) as Item)
}

/// A named input or output of a stage kind.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
    pub doc: &'static str,
}

impl Port {
    /// A port whose items go to at most one consumer.
    pub fn of<T: Send + 'static>(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            ty: PortType {
                name: short_type_name::<T>(),
                id: TypeId::of::<T>(),
                clone: None,
            },
        }
    }
    /// A port whose items may be copied to several consumers.
    pub fn cloneable<T: Clone + Send + 'static>(name: &'static str, doc: &'static str) -> Port {
        Port {
            name,
            doc,
            ty: PortType {
                name: short_type_name::<T>(),
                id: TypeId::of::<T>(),
                clone: Some(clone_item::<T>),
            },
        }
    }
}

pub(crate) enum Msg {
    Item { seq: u64, minor: u32, item: Item },
    Done { seq: u64 },
}

/// How far workers may run ahead of the relays that restore order.
pub(crate) struct Window {
    pub(crate) next: Vec<AtomicU64>,
    pub(crate) size: u64,
    pub(crate) lock: Mutex<()>,
    pub(crate) cv: Condvar,
}

impl Window {
    /// A window of `size` units over `next`, the next unit each relay waits for.
    pub(crate) fn new(next: Vec<AtomicU64>, size: u64) -> Self {
        Window {
            next,
            size,
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

impl Window {
    fn min_next(&self) -> u64 {
        self.next
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .min()
            .unwrap_or(u64::MAX)
    }
    fn wait(&self, seq: u64, cancel: &CancelToken) -> Result<(), StageError> {
        let mut guard = self
            .lock
            .lock()
            .map_err(|_| StageError::failed("internal: window lock poisoned"))?;
        while seq >= self.min_next().saturating_add(self.size) {
            if cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            guard = self
                .cv
                .wait_timeout(guard, Duration::from_millis(20))
                .map_err(|_| StageError::failed("internal: window lock poisoned"))?
                .0;
        }
        Ok(())
    }
    pub(crate) fn advance(&self, relay: usize, next: u64) {
        self.next[relay].store(next, Ordering::SeqCst);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

pub(crate) struct OutPort {
    pub(crate) senders: Vec<Sender<Msg>>,
    pub(crate) clone: Option<CloneFn>,
    pub(crate) counter: u64,
    pub(crate) minor: u32,
    pub(crate) connected: bool,
}

impl OutPort {
    pub(crate) fn new(senders: Vec<Sender<Msg>>, clone: Option<CloneFn>, connected: bool) -> Self {
        OutPort {
            senders,
            clone,
            counter: 0,
            minor: 0,
            connected,
        }
    }
}

/// Sends `item` to every sender (copies for all but the last). Drops senders whose consumer has
/// finished; `Closed` once none is left.
pub(crate) fn fan_out(
    senders: &mut Vec<Sender<Msg>>,
    clone: Option<CloneFn>,
    seq: u64,
    minor: u32,
    item: Item,
    cancel: &CancelToken,
) -> Result<(), StageError> {
    let mut item = Some(item);
    let mut i = 0;
    while i < senders.len() {
        let last = i + 1 == senders.len();
        let payload = if last {
            item.take()
        } else {
            match (clone, item.as_ref()) {
                (Some(f), Some(it)) => f(it),
                _ => None,
            }
        };
        let Some(payload) = payload else {
            return Err(StageError::failed(
                "internal: cannot copy an item for several consumers",
            ));
        };
        let msg = Msg::Item {
            seq,
            minor,
            item: payload,
        };
        select! {
            send(senders[i], msg) -> r => {
                if r.is_err() {
                    senders.remove(i);
                    continue;
                }
            }
            recv(cancel.rx()) -> _ => return Err(StageError::Cancelled),
        }
        i += 1;
    }
    if senders.is_empty() {
        return Err(StageError::Closed);
    }
    Ok(())
}

pub(crate) struct InPort {
    pub(crate) rx: Receiver<Msg>,
    /// Leading items to drop (resume, when the producer cannot skip them itself).
    pub(crate) discard: u64,
}

/// What a running stage instance uses to receive, send, claim work and report progress.
pub struct StageIo {
    pub(crate) stage: String,
    pub(crate) worker: usize,
    pub(crate) workers: usize,
    pub(crate) inputs: Vec<InPort>,
    pub(crate) outputs: Vec<OutPort>,
    /// Tag outputs with the current unit (the stage runs as several workers).
    pub(crate) tagged: bool,
    pub(crate) current: Option<u64>,
    pub(crate) cancel: CancelToken,
    pub(crate) stats: Arc<Stats>,
    pub(crate) window: Option<Arc<Window>>,
    pub(crate) claims: Arc<AtomicU64>,
    pub(crate) skip: Vec<u64>,
    pub(crate) progress: Arc<Progress>,
}

impl StageIo {
    pub fn stage(&self) -> &str {
        &self.stage
    }
    pub fn worker(&self) -> usize {
        self.worker
    }
    pub fn workers(&self) -> usize {
        self.workers
    }
    pub fn progress(&self) -> &Progress {
        &self.progress
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// Returns `Err(Cancelled)` once the run is being stopped; call it inside long loops.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
    /// Whether output `port` has any consumer (a stage may skip work nobody reads).
    pub fn is_connected(&self, port: usize) -> bool {
        self.outputs.get(port).is_some_and(|o| o.connected)
    }
    /// Leading items of output `port` that its consumer already holds from an earlier run; a
    /// source that declares `HONORS_SKIP` starts after them.
    pub fn skip_leading(&self, port: usize) -> u64 {
        self.skip.get(port).copied().unwrap_or(0)
    }

    /// Adds `n` to this stage's count `name` (files rejected, utterances dropped, parts
    /// skipped): summed over workers, shown under the end-of-run table and saved in the `counts`
    /// column of the `stages` table.
    pub fn count(&self, name: &str, n: u64) {
        self.stats.count(name, n);
    }
    /// A line for the person running the pipeline (what was resumed, what was skipped),
    /// printed above the progress bars, never through them.
    pub fn note(&self, line: impl std::fmt::Display) {
        self.progress.note(&format!("{}: {line}", self.stage));
    }

    /// Runs `f`, a wait for input that arrives outside the channels (a learner's new weights),
    /// and counts its time as starved rather than busy.
    pub fn starved_while<R>(&self, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
        r
    }

    fn finish_unit(&mut self) {
        if let (true, Some(seq)) = (self.tagged, self.current.take()) {
            for o in &mut self.outputs {
                o.minor = 0;
                o.senders.retain(|s| s.send(Msg::Done { seq }).is_ok());
            }
        }
    }

    /// Waits until the ordering window admits item `seq`. Being held back means downstream has
    /// not taken the earlier items yet: back-pressure, not work.
    fn wait_in_order(&self, seq: u64) -> Result<(), StageError> {
        let Some(w) = &self.window else { return Ok(()) };
        let t0 = Instant::now();
        let r = w.wait(seq, &self.cancel);
        Stats::add(&self.stats.blocked_ns, t0.elapsed().as_nanos() as u64);
        r
    }

    /// Next unit of work for a parallel source: indices `0..total`, each handed to one worker.
    pub fn claim(&mut self, total: u64) -> Result<Option<u64>, StageError> {
        self.finish_unit();
        self.check_cancelled()?;
        let s = self.claims.fetch_add(1, Ordering::SeqCst);
        if s >= total {
            return Ok(None);
        }
        self.wait_in_order(s)?;
        if self.tagged {
            self.current = Some(s);
        }
        Stats::add(&self.stats.items_in, 1);
        Ok(Some(s))
    }

    /// Receives the next item of input `port`; `None` once the producer has finished.
    pub fn recv<T: 'static>(&mut self, port: usize) -> Result<Option<T>, StageError> {
        self.finish_unit();
        let stage = self.stage.clone();
        let Some(input) = self.inputs.get_mut(port) else {
            return Err(StageError::failed(format!(
                "internal: stage `{stage}` has no input #{port}"
            )));
        };
        loop {
            let t0 = Instant::now();
            let msg = select! {
                recv(input.rx) -> m => m,
                recv(self.cancel.rx()) -> _ => {
                    Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
                    return Err(StageError::Cancelled);
                }
            };
            Stats::add(&self.stats.starved_ns, t0.elapsed().as_nanos() as u64);
            match msg {
                Err(_) => return Ok(None),
                Ok(Msg::Done { .. }) => continue,
                Ok(Msg::Item { seq, item, .. }) => {
                    if input.discard > 0 {
                        input.discard -= 1;
                        continue;
                    }
                    Stats::add(&self.stats.items_in, 1);
                    if self.tagged {
                        self.wait_in_order(seq)?;
                        self.current = Some(seq);
                    }
                    return match item.downcast::<T>() {
                        Ok(t) => Ok(Some(*t)),
                        Err(_) => Err(StageError::failed(format!(
                            "internal: input #{port} of `{stage}` is not of type {}",
                            std::any::type_name::<T>()
                        ))),
                    };
                }
            }
        }
    }

    /// Sends an item on output `port`. `Err(Closed)` when no consumer wants more.
    pub fn send<T: Send + 'static>(&mut self, port: usize, item: T) -> Result<(), StageError> {
        let stage = self.stage.clone();
        let current = self.current;
        let tagged = self.tagged;
        let Some(out) = self.outputs.get_mut(port) else {
            return Err(StageError::failed(format!(
                "internal: stage `{stage}` has no output #{port}"
            )));
        };
        Stats::add(&self.stats.items_out, 1);
        if !out.connected {
            return Ok(());
        }
        let (seq, minor) = if tagged {
            let Some(seq) = current else {
                return Err(StageError::failed(format!(
                    "internal: parallel stage `{stage}` sent outside a unit of work"
                )));
            };
            out.minor += 1;
            (seq, out.minor - 1)
        } else {
            out.counter += 1;
            (out.counter - 1, 0)
        };
        let t0 = Instant::now();
        let r = fan_out(
            &mut out.senders,
            out.clone,
            seq,
            minor,
            Box::new(item),
            &self.cancel,
        );
        Stats::add(&self.stats.blocked_ns, t0.elapsed().as_nanos() as u64);
        if matches!(r, Err(StageError::Closed))
            && self
                .outputs
                .iter()
                .any(|o| o.connected && !o.senders.is_empty())
        {
            // This port's consumers are done but others still read: keep going.
            return Ok(());
        }
        r
    }

    pub(crate) fn close(&mut self) {
        self.finish_unit();
        for o in &mut self.outputs {
            o.senders.clear();
        }
        self.inputs.clear();
    }
}

/// Puts the units of a parallel stage's output back in order and hands them on.
pub(crate) fn relay(
    rx: Receiver<Msg>,
    mut out: OutPort,
    window: Arc<Window>,
    index: usize,
    cancel: CancelToken,
) -> Result<(), StageError> {
    let mut buffer: BTreeMap<u64, Vec<(u32, Item)>> = BTreeMap::new();
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut next: u64 = 0;
    let mut counter: u64 = 0;
    let emit =
        |items: Vec<(u32, Item)>, out: &mut OutPort, counter: &mut u64| -> Result<(), StageError> {
            let mut items = items;
            items.sort_by_key(|(m, _)| *m);
            for (_, item) in items {
                fan_out(&mut out.senders, out.clone, *counter, 0, item, &cancel)?;
                *counter += 1;
            }
            Ok(())
        };
    loop {
        let msg = select! {
            recv(rx) -> m => m,
            recv(cancel.rx()) -> _ => return Err(StageError::Cancelled),
        };
        match msg {
            Err(_) => break,
            // The unit at the head streams through as it comes (a worker sends a unit's items
            // in order): a unit of many items (a long file's segments) is never held whole.
            Ok(Msg::Item { item, seq, .. }) if seq == next => {
                fan_out(&mut out.senders, out.clone, counter, 0, item, &cancel)?;
                counter += 1;
            }
            Ok(Msg::Item { seq, minor, item }) => {
                buffer.entry(seq).or_default().push((minor, item))
            }
            Ok(Msg::Done { seq }) => {
                done.insert(seq);
            }
        }
        let head = next;
        while done.remove(&next) {
            if let Some(items) = buffer.remove(&next) {
                emit(items, &mut out, &mut counter)?;
            }
            next += 1;
            window.advance(index, next);
        }
        if next != head {
            // The new head: what it sent so far goes out now, the rest streams.
            if let Some(items) = buffer.remove(&next) {
                emit(items, &mut out, &mut counter)?;
            }
        }
    }
    // Every worker has finished: hand on what is left, in order.
    if !cancel.is_cancelled() {
        for (_, items) in std::mem::take(&mut buffer) {
            emit(items, &mut out, &mut counter)?;
        }
    }
    window.advance(index, u64::MAX / 2);
    Ok(())
}
