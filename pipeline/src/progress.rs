//! Progress of long stages: indicatif bars on a terminal, plain periodic lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One stage's progress, shared by its workers.
pub struct Progress {
    pub(crate) stage: String,
    pos: AtomicU64,
    len: AtomicU64,
    unit: Mutex<String>,
    bar: Mutex<Option<ProgressBar>>,
    multi: Option<MultiProgress>,
    started: Instant,
}

impl Progress {
    pub(crate) fn new(stage: &str, multi: Option<MultiProgress>) -> Self {
        Progress {
            stage: stage.to_string(),
            pos: AtomicU64::new(0),
            len: AtomicU64::new(0),
            unit: Mutex::new("items".into()),
            bar: Mutex::new(None),
            multi,
            started: Instant::now(),
        }
    }

    /// Prints a line above the bars (or on stderr without them), with or without `--quiet`
    /// (what a stage says: rejected files, resumes).
    pub fn note(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                if m.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            None => eprintln!("{line}"),
        }
    }

    /// Announces the amount of work (e.g. the number of files) and its unit.
    pub fn set_length(&self, len: u64, unit: &str) {
        self.len.store(len, Ordering::Relaxed);
        if let Ok(mut u) = self.unit.lock() {
            *u = unit.to_string();
        }
        if let (Some(multi), Ok(mut bar)) = (&self.multi, self.bar.lock()) {
            let b = bar.get_or_insert_with(|| multi.add(ProgressBar::new(len)));
            b.set_length(len);
            let style = ProgressStyle::with_template(&format!(
                "{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style.progress_chars("=> "));
            b.set_prefix(self.stage.clone());
            b.set_position(self.pos.load(Ordering::Relaxed));
        }
    }

    /// Adds `n` units of finished work.
    pub fn inc(&self, n: u64) {
        self.pos.fetch_add(n, Ordering::Relaxed);
        if let Ok(bar) = self.bar.lock() {
            if let Some(b) = bar.as_ref() {
                b.inc(n);
            }
        }
    }

    pub fn position(&self) -> u64 {
        self.pos.load(Ordering::Relaxed)
    }
    pub fn length(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// A plain progress line, for logs that are not a terminal.
    pub(crate) fn line(&self) -> Option<String> {
        let len = self.length();
        let pos = self.position();
        if len == 0 && pos == 0 {
            return None;
        }
        let unit = self.unit.lock().map(|u| u.clone()).unwrap_or_default();
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { pos as f64 / secs } else { 0.0 };
        Some(if len > 0 {
            format!(
                "{}: {pos}/{len} {unit} ({:.0}%), {rate:.1} {unit}/s, {secs:.0} s",
                self.stage,
                100.0 * pos as f64 / len as f64
            )
        } else {
            format!(
                "{}: {pos} {unit}, {rate:.1} {unit}/s, {secs:.0} s",
                self.stage
            )
        })
    }

    pub(crate) fn finish(&self) {
        if let Ok(bar) = self.bar.lock() {
            if let Some(b) = bar.as_ref() {
                b.finish();
            }
        }
    }
}
