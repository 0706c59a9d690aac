//! "Did you mean ...?": the closest known name to a mistyped one, by edit distance.

/// The candidate closest to `word`, if it is close enough to be a likely typo: at most one edit
/// per three characters (at least one, but fewer edits than `word` has characters; swapping two
/// neighbours is one edit), or `word` is a prefix of the candidate (`deadline` for
/// `deadline_ms`). Case is ignored; ties go to the
/// first candidate.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Names and keys are short; a very long word is nobody's typo (and must not cost
    // len x len work on a change path).
    if word.len() > MAX_WORD {
        return None;
    }
    let w = word.to_lowercase();
    let len = w.chars().count();
    let limit = (len / 3).max(1).min(len.saturating_sub(1));
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        if c == word {
            continue;
        }
        if c.len() > MAX_WORD {
            continue;
        }
        let lc = c.to_lowercase();
        let prefix = len >= 3 && lc.starts_with(&w);
        if !prefix && lc.chars().count().abs_diff(len) > limit {
            continue; // the length difference alone is more edits than allowed
        }
        let d = distance(&w, &lc);
        if (d <= limit || prefix) && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Words (in bytes) beyond which no suggestion is looked for.
const MAX_WORD: usize = 64;

/// `"; did you mean `x`?"` when there is a close candidate, else nothing: for the end of a
/// message.
pub fn hint<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default()
}

/// Edit distance with adjacent transpositions (optimal string alignment), over chars.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key_and_strangers_find_nothing() {
        let keys = ["kind", "weights", "version", "device", "replicas", "batch", "queue", "params"];
        assert_eq!(did_you_mean("weigths", keys), Some("weights"));
        assert_eq!(did_you_mean("replica", keys), Some("replicas"));
        assert_eq!(did_you_mean("Kind", keys), Some("kind"));
        assert_eq!(did_you_mean("sed", ["in", "out", "seed", "quantize"]), Some("seed"));
        assert_eq!(did_you_mean("deadline", ["inputs", "outputs", "deadline_ms", "nodes"]), Some("deadline_ms"));
        assert_eq!(did_you_mean("colour", keys), None);
        assert_eq!(did_you_mean("x", ["y", "out"]), None);
        assert_eq!(did_you_mean("xx", ["x"]), Some("x"));
        assert_eq!(did_you_mean("nope", ["out"]), None);
        assert_eq!(hint("qeue", keys), "; did you mean `queue`?");
        assert_eq!(hint("zzz", keys), "");
        let long = "w".repeat(100_000);
        assert_eq!(did_you_mean(&long, [long.as_str(), "weights"]), None, "no quadratic work on huge names");
    }
}
