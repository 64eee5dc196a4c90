//! The letter vocabulary of CTC fine-tuning in fairseq's convention: `dict.ltr.txt` lists one
//! symbol and its count per line (letters, the apostrophe, `|` the word boundary), and a letter
//! transcript is the words' letters separated by spaces with `|` closing each word
//! (`H E L L O | W O R L D |`, fairseq's `.ltr` files). Index 0 is the CTC blank (fairseq's `<s>`,
//! which wav2vec 2.0's CTC uses as blank); the file's symbols follow in its order.

use std::collections::BTreeMap;

pub const BLANK: u32 = 0;
pub const WORD_BOUNDARY: char = '|';

/// Symbols by index (index 0 is the blank).
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub symbols: Vec<String>,
}

/// What encoding a transcript found outside the vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unknown {
    /// Character → occurrences (they are left out of the labels, and reported).
    pub chars: BTreeMap<char, u64>,
}

impl Vocab {
    /// The vocabulary of `transcripts`: every character but whitespace, and `|`, most frequent
    /// first (ties by character), as fairseq's `Dictionary.finalize` orders them.
    pub fn from_transcripts<'a>(transcripts: impl IntoIterator<Item = &'a str>) -> Vocab {
        let mut counts: BTreeMap<char, u64> = BTreeMap::new();
        for t in transcripts {
            for w in t.split_whitespace() {
                for c in w.chars() {
                    *counts.entry(c).or_default() += 1;
                }
                *counts.entry(WORD_BOUNDARY).or_default() += 1;
            }
        }
        let mut v: Vec<(char, u64)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut symbols = vec!["<blank>".to_string()];
        symbols.extend(v.into_iter().map(|(c, _)| c.to_string()));
        Vocab { symbols }
    }

    /// Reads `dict.ltr.txt` (`SYMBOL COUNT` per line; the count is optional).
    pub fn parse_dict(text: &str) -> Result<Vocab, String> {
        let mut symbols = vec!["<blank>".to_string()];
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let sym = parts.next().unwrap_or("");
            if sym.chars().count() != 1 {
                return Err(format!(
                    "line {}: `{sym}` is not one character (a letter vocabulary holds single characters)",
                    i + 1
                ));
            }
            if let Some(c) = parts.next() {
                if c.parse::<u64>().is_err() {
                    return Err(format!("line {}: count `{c}` is not a number", i + 1));
                }
            }
            if symbols.iter().any(|s| s == sym) {
                return Err(format!("line {}: `{sym}` appears twice", i + 1));
            }
            symbols.push(sym.to_string());
        }
        if symbols.len() < 2 {
            return Err("no symbols".into());
        }
        Ok(Vocab { symbols })
    }

    /// `dict.ltr.txt` text (counts from `transcripts`, 0 for symbols they lack).
    pub fn to_dict<'a>(&self, transcripts: impl IntoIterator<Item = &'a str>) -> String {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for t in transcripts {
            for w in t.split_whitespace() {
                for c in w.chars() {
                    *counts.entry(c.to_string()).or_default() += 1;
                }
                *counts.entry(WORD_BOUNDARY.to_string()).or_default() += 1;
            }
        }
        self.symbols[1..]
            .iter()
            .map(|s| format!("{s} {}\n", counts.get(s).copied().unwrap_or(0)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.len() <= 1
    }

    fn index(&self, c: char) -> Option<u32> {
        let mut buf = [0u8; 4];
        let s = c.encode_utf8(&mut buf);
        self.symbols.iter().position(|x| x == s).map(|i| i as u32)
    }

    /// Labels of a transcript: each word's letters then `|`; characters outside the vocabulary
    /// are left out and counted in `unknown`.
    pub fn encode(&self, transcript: &str, unknown: &mut Unknown) -> Vec<u32> {
        let bar = self.index(WORD_BOUNDARY);
        let mut out = Vec::new();
        for w in transcript.split_whitespace() {
            for c in w.chars() {
                match self.index(c) {
                    Some(i) => out.push(i),
                    None => *unknown.chars.entry(c).or_default() += 1,
                }
            }
            if let Some(b) = bar {
                out.push(b);
            }
        }
        out
    }

    /// Greedy CTC decoding of per-frame best indices: repeats merged, blanks dropped, `|` read as
    /// the word boundary. Returns the words joined by single spaces.
    pub fn greedy_decode(&self, best: &[u32]) -> String {
        let mut letters = String::new();
        let mut prev = None;
        for &k in best {
            if Some(k) != prev && k != BLANK {
                if let Some(s) = self.symbols.get(k as usize) {
                    letters.push_str(s);
                }
            }
            prev = Some(k);
        }
        letters
            .split(WORD_BOUNDARY)
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}
