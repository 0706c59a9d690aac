//! How the learning parameters are laid out for the parameter servers: every learning tensor
//! in one flat `f32` vector (in a fixed order, so every worker and server agrees), cut into
//! `servers` contiguous, near-equal ranges, one per server. A server owns its range whatever
//! tensors it cuts across; a worker splits each flattened gradient the same way and sends
//! each part to its server.

use std::collections::BTreeMap;
use std::ops::Range;

/// The flat order of named tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `(name, shape, offset)`, sorted by name.
    tensors: Vec<(String, Vec<usize>, usize)>,
    len: usize,
}

impl Layout {
    /// The layout of `shapes` (by name; the order is the names' order).
    pub fn new(shapes: &BTreeMap<String, Vec<usize>>) -> Self {
        let mut len = 0;
        let tensors = shapes
            .iter()
            .map(|(name, shape)| {
                let at = len;
                len += shape.iter().product::<usize>();
                (name.clone(), shape.clone(), at)
            })
            .collect();
        Self { tensors, len }
    }

    /// Values in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tensors: name, shape and where each starts in the flat vector.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], Range<usize>)> {
        self.tensors.iter().map(|(n, s, at)| (n.as_str(), s.as_slice(), *at..*at + s.iter().product::<usize>()))
    }

    /// One flat vector from per-tensor values.
    ///
    /// # Errors
    /// A tensor missing from `values`, or of another size than its shape.
    pub fn flatten(&self, values: &BTreeMap<String, Vec<f32>>) -> Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(self.len);
        for (name, _, range) in self.tensors() {
            let v = values.get(name).ok_or_else(|| format!("no values for tensor `{name}`"))?;
            if v.len() != range.len() {
                return Err(format!("tensor `{name}` has {} values, expected {}", v.len(), range.len()));
            }
            out.extend_from_slice(v);
        }
        Ok(out)
    }

    /// Per-tensor values from a flat vector of [`Self::len`] values.
    ///
    /// # Panics
    /// If `flat` is not [`Self::len`] long.
    pub fn unflatten(&self, flat: &[f32]) -> BTreeMap<String, Vec<f32>> {
        assert_eq!(flat.len(), self.len, "flat vector of another length");
        self.tensors().map(|(name, _, range)| (name.to_string(), flat[range].to_vec())).collect()
    }
}

/// `len` values cut into `parts` contiguous ranges whose sizes differ by at most one (the first
/// ones the larger); `parts` is at least 1, and no range is empty unless `len < parts`.
pub fn ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let r = start..end;
            start = end;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once_and_evenly() {
        for (len, parts) in [(10, 3), (9, 3), (2, 5), (0, 2), (7, 1), (7, 0)] {
            let r = ranges(len, parts);
            assert_eq!(r.len(), parts.max(1));
            assert_eq!(r.first().unwrap().start, 0);
            assert_eq!(r.last().unwrap().end, len);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<usize> = r.iter().map(ExactSizeIterator::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{len}/{parts}: {sizes:?}");
        }
        assert_eq!(ranges(10, 3), vec![0..4, 4..7, 7..10]);
    }

    #[test]
    fn flatten_and_unflatten_are_inverse() {
        let shapes = BTreeMap::from([("b.bias".to_string(), vec![3]), ("a.weight".to_string(), vec![3, 2])]);
        let layout = Layout::new(&shapes);
        assert_eq!(layout.len(), 9);
        let names: Vec<&str> = layout.tensors().map(|(n, _, _)| n).collect();
        assert_eq!(names, ["a.weight", "b.bias"]);
        let values = BTreeMap::from([
            ("a.weight".to_string(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ("b.bias".to_string(), vec![7.0, 8.0, 9.0]),
        ]);
        let flat = layout.flatten(&values).unwrap();
        assert_eq!(flat, (1..=9).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(layout.unflatten(&flat), values);
        let mut short = values.clone();
        short.get_mut("b.bias").unwrap().pop();
        assert_eq!(layout.flatten(&short).unwrap_err(), "tensor `b.bias` has 2 values, expected 3");
        short.remove("b.bias");
        assert_eq!(layout.flatten(&short).unwrap_err(), "no values for tensor `b.bias`");
    }
}
