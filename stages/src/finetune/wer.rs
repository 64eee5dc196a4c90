//! Word and character error rates: the Levenshtein alignment of a hypothesis against its
//! reference, with the substitutions, insertions and deletions it takes.

/// Edit counts of one hypothesis against its reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Edits {
    pub substitutions: usize,
    pub insertions: usize,
    pub deletions: usize,
    /// Tokens in the reference.
    pub reference: usize,
}

impl Edits {
    pub fn errors(&self) -> usize {
        self.substitutions + self.insertions + self.deletions
    }
    /// errors / reference tokens (NaN for an empty reference).
    pub fn rate(&self) -> f64 {
        if self.reference == 0 {
            f64::NAN
        } else {
            self.errors() as f64 / self.reference as f64
        }
    }
    pub fn add(&mut self, o: Edits) {
        self.substitutions += o.substitutions;
        self.insertions += o.insertions;
        self.deletions += o.deletions;
        self.reference += o.reference;
    }
}

/// Minimum edits turning `r` into `h` (ties broken towards substitutions, then deletions).
pub fn align<T: PartialEq>(r: &[T], h: &[T]) -> Edits {
    let (n, m) = (r.len(), h.len());
    // d[i][j]: (errors, subs, ins, dels) for r[..i] against h[..j]
    let mut prev: Vec<(usize, usize, usize, usize)> = (0..=m).map(|j| (j, 0, j, 0)).collect();
    for i in 1..=n {
        let mut cur = vec![(i, 0, 0, i); m + 1];
        for j in 1..=m {
            let (e, s, ins, del) = prev[j - 1];
            let diag = if r[i - 1] == h[j - 1] {
                (e, s, ins, del)
            } else {
                (e + 1, s + 1, ins, del)
            };
            let (e, s, ins, del) = prev[j];
            let up = (e + 1, s, ins, del + 1);
            let (e, s, ins, del) = cur[j - 1];
            let left = (e + 1, s, ins + 1, del);
            cur[j] = [diag, up, left]
                .into_iter()
                .min_by_key(|c| c.0)
                .unwrap_or(diag);
        }
        prev = cur;
    }
    let (_, s, i, d) = prev[m];
    Edits {
        substitutions: s,
        insertions: i,
        deletions: d,
        reference: n,
    }
}

/// Word edits: both sides split on whitespace.
pub fn word_edits(reference: &str, hypothesis: &str) -> Edits {
    let r: Vec<&str> = reference.split_whitespace().collect();
    let h: Vec<&str> = hypothesis.split_whitespace().collect();
    align(&r, &h)
}

/// Character edits: the words of each side joined by single spaces, spaces counted as characters.
pub fn char_edits(reference: &str, hypothesis: &str) -> Edits {
    let norm = |s: &str| -> Vec<char> {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect()
    };
    align(&norm(reference), &norm(hypothesis))
}
