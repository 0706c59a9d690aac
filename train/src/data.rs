//! Training data: rows of numbers in a CSV file, plain or gzip-compressed (told apart by the
//! gzip magic bytes, not the file name).
//!
//! The format: one example per line, values separated by commas (spaces around them ignored),
//! every line with the same number of values; blank lines are skipped; with `header` the first
//! line names the columns and is not data. [`Columns`] says which columns feed which pipeline
//! input (a range of columns becomes one row of that input, in order) and which column is the
//! label (an integer class, `0 <= label < classes`). `data/digits.csv.gz` is 64 pixel columns
//! then the label: `inputs = { pixels = "0..64" }, label = 64`.
//!
//! Everything is checked before training starts: a wrong number of values, an empty or
//! non-numeric value (NaN and infinities included), a label that is not an integer or is
//! outside the classes are [`DataError::Row`]s naming `file:line` and the column.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why the data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read or decompressed.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the file is not a valid example.
    #[error("{}:{line}: {message}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The column selection does not fit the file, or the file has no examples.
    #[error("`{}`: {message}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A column selection as written: `"3"` or `"0..64"` (end exclusive).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColumnRange(pub Range<usize>);

impl std::str::FromStr for ColumnRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a column or a range of columns (`3`, `0..64`)");
        match s.split_once("..") {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a < b { Ok(Self(a..b)) } else { Err(format!("`{s}` is an empty range of columns")) }
            }
            None => {
                let c: usize = s.trim().parse().map_err(|_| bad())?;
                Ok(Self(c..c + 1))
            }
        }
    }
}

/// Which columns make up each input and which is the label.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Columns {
    /// Pipeline input name and its columns, in order.
    pub inputs: Vec<(String, ColumnRange)>,
    /// The label column.
    pub label: usize,
    /// How many classes a label may name (`0..classes`).
    pub classes: usize,
    /// Whether the first line is a header.
    pub header: bool,
}

/// The examples of one file, as the columns selected them.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Per input (in [`Columns::inputs`] order): its name, its width and `rows * width` values.
    pub inputs: Vec<(String, usize, Vec<f32>)>,
    /// One label per example.
    pub labels: Vec<u32>,
}

impl Table {
    /// Number of examples.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The examples at `indices`, in that order (a shard, a batch, a held-out split).
    pub fn select(&self, indices: &[usize]) -> Table {
        let inputs = self
            .inputs
            .iter()
            .map(|(name, w, values)| {
                let mut v = Vec::with_capacity(indices.len() * w);
                for &i in indices {
                    v.extend_from_slice(&values[i * w..(i + 1) * w]);
                }
                (name.clone(), *w, v)
            })
            .collect();
        Table { inputs, labels: indices.iter().map(|&i| self.labels[i]).collect() }
    }
}

/// Reads `path` (CSV or gzip-CSV) into a [`Table`], checking every line.
pub fn load(path: &Path, columns: &Columns) -> Result<Table, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let bytes = std::fs::read(path).map_err(io)?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice()).read_to_string(&mut s).map_err(io)?;
        s
    } else {
        String::from_utf8(bytes).map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
    };
    parse(path, &text, columns)
}

/// [`load`] on text already read (`path` only names it in errors).
pub fn parse(path: &Path, text: &str, columns: &Columns) -> Result<Table, DataError> {
    let row_error = |line: usize, message: String| DataError::Row { path: path.to_path_buf(), line, message };
    let needed = columns.inputs.iter().map(|(_, r)| r.0.end).chain([columns.label + 1]).max().unwrap_or(0);
    let mut inputs: Vec<(String, usize, Vec<f32>)> =
        columns.inputs.iter().map(|(name, r)| (name.clone(), r.0.len(), Vec::new())).collect();
    let mut labels = Vec::new();
    let mut width = None;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim().is_empty());
    if columns.header {
        lines.next();
    }
    let mut values: Vec<f32> = Vec::new();
    for (line, text) in lines {
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        match width {
            None if fields.len() < needed => {
                return Err(DataError::Shape {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {line} has {} columns but the selection needs {needed} (columns 0..{needed})",
                        fields.len()
                    ),
                });
            }
            None => width = Some(fields.len()),
            Some(w) if w != fields.len() => {
                return Err(row_error(
                    line,
                    format!("expected {w} values (as on the first line), found {}", fields.len()),
                ));
            }
            Some(_) => {}
        }
        values.clear();
        for (c, f) in fields.iter().enumerate() {
            if f.is_empty() {
                return Err(row_error(line, format!("column {c} is empty")));
            }
            match f.parse::<f32>() {
                Ok(v) if v.is_finite() => values.push(v),
                _ => return Err(row_error(line, format!("column {c}: `{f}` is not a finite number"))),
            }
        }
        let label = values[columns.label];
        if label.fract() != 0.0 || label < 0.0 {
            return Err(row_error(line, format!("label (column {}) `{label}` is not a class number", columns.label)));
        }
        if label as usize >= columns.classes {
            return Err(row_error(
                line,
                format!(
                    "label {label} (column {}) is outside the {} classes (0..{})",
                    columns.label, columns.classes, columns.classes
                ),
            ));
        }
        labels.push(label as u32);
        for ((_, _, out), (_, r)) in inputs.iter_mut().zip(&columns.inputs) {
            out.extend_from_slice(&values[r.0.clone()]);
        }
    }
    if labels.is_empty() {
        return Err(DataError::Shape { path: path.to_path_buf(), message: "no examples in the file".into() });
    }
    Ok(Table { inputs, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Columns {
        Columns { inputs: vec![("x".into(), "0..3".parse().unwrap())], label: 3, classes: 2, header: false }
    }

    fn err(text: &str) -> String {
        parse(Path::new("d.csv"), text, &cols()).unwrap_err().to_string()
    }

    #[test]
    fn rows_become_inputs_and_labels() {
        let t = parse(Path::new("d.csv"), "1,2,3,0\n\n 4 , 5,6, 1\n", &cols()).unwrap();
        assert_eq!(t.inputs, vec![("x".to_string(), 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])]);
        assert_eq!(t.labels, vec![0, 1]);
        assert_eq!(t.select(&[1]).inputs[0].2, vec![4.0, 5.0, 6.0]);
        let with_header = Columns { header: true, ..cols() };
        assert_eq!(parse(Path::new("d.csv"), "a,b,c,y\n1,2,3,1\n", &with_header).unwrap().labels, vec![1]);
    }

    #[test]
    fn every_bad_row_names_its_line_and_column() {
        assert_eq!(err("1,2,3,0\n1,2,0\n"), "d.csv:2: expected 4 values (as on the first line), found 3");
        assert_eq!(err("1,2,3,0\n1,,3,0\n"), "d.csv:2: column 1 is empty");
        assert_eq!(err("1,2,3,0\n\n1,x,3,0\n"), "d.csv:3: column 1: `x` is not a finite number");
        assert_eq!(err("1,2,NaN,0\n"), "d.csv:1: column 2: `NaN` is not a finite number");
        assert_eq!(err("1,2,3,1.5\n"), "d.csv:1: label (column 3) `1.5` is not a class number");
        assert_eq!(err("1,2,3,7\n"), "d.csv:1: label 7 (column 3) is outside the 2 classes (0..2)");
        assert_eq!(err("1,2,3\n"), "`d.csv`: line 1 has 3 columns but the selection needs 4 (columns 0..4)");
        assert_eq!(err("\n\n"), "`d.csv`: no examples in the file");
    }

    #[test]
    fn column_ranges_parse() {
        assert_eq!("0..64".parse::<ColumnRange>().unwrap(), ColumnRange(0..64));
        assert_eq!("64".parse::<ColumnRange>().unwrap(), ColumnRange(64..65));
        assert!("5..5".parse::<ColumnRange>().unwrap_err().contains("empty"));
        assert!("a..b".parse::<ColumnRange>().unwrap_err().contains("not a column"));
    }

    #[test]
    fn the_committed_digits_load_gzipped() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits.csv.gz");
        let c = Columns {
            inputs: vec![("pixels".into(), "0..64".parse().unwrap())],
            label: 64,
            classes: 10,
            header: false,
        };
        let t = load(&path, &c).unwrap();
        assert_eq!(t.rows(), 1797);
        assert_eq!(t.inputs[0].1, 64);
        assert_eq!(t.inputs[0].2.len(), 1797 * 64);
        assert!(t.labels.iter().all(|&l| l < 10));
        // Too few classes for the labels: refused at the first row past them.
        let e = load(&path, &Columns { classes: 3, ..c }).unwrap_err().to_string();
        assert!(e.contains("digits.csv.gz:") && e.contains("outside the 3 classes"), "{e}");
    }
}
