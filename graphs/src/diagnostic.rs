//! Diagnostics: what the checker says about a graph, located as `file:line:col`.
//!
//! The checker never stops at the first problem: every problem it can find is collected as a
//! [`Diagnostic`], and a graph with at least one error is rejected as a whole ([`Diagnostics`]).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One TOML source: its name as shown in diagnostics, its text, and the directory relative paths
/// in it (weights, params files) are resolved against.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The name shown in diagnostics (usually the path as the user typed it).
    pub name: String,
    /// The TOML text.
    pub text: String,
    /// Where relative paths inside this file point from (the file's own directory).
    pub base_dir: PathBuf,
    /// Byte offset of the start of every line, for offset -> line:col.
    line_starts: Vec<usize>,
}

impl SourceFile {
    /// A source from text already in memory. `base_dir` resolves relative paths in it.
    pub fn new(name: impl Into<String>, text: impl Into<String>, base_dir: impl Into<PathBuf>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { name: name.into(), text, base_dir: base_dir.into(), line_starts }
    }

    /// Reads a file; relative paths inside it resolve against the file's directory.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        // A bare file name has an empty parent: relative paths then stay relative to the
        // working directory, and messages show them as written.
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self::new(path.display().to_string(), text, base_dir))
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        // Offsets from the parser are char boundaries; be defensive anyway.
        let col = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count()) + 1;
        (line, col)
    }

    /// The location of a byte span's start.
    pub fn locate(self: &Arc<Self>, span: &Range<usize>) -> Location {
        let (line, col) = self.line_col(span.start);
        Location { file: self.name.clone(), line, col }
    }
}

/// A place in a TOML source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// The source's name (usually its path).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// How serious a diagnostic is: errors reject the graph, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The graph cannot run.
    Error,
    /// The graph runs, but something is probably not what the author meant.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem found in a graph: `file:line:col: error: message`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where it is; `None` for problems that have no place in a file (an unreadable file).
    pub location: Option<Location>,
    /// What is wrong, naming the key, node, port or shape involved.
    pub message: String,
}

impl Diagnostic {
    /// An error at a location.
    pub fn error(location: Option<Location>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Error, location, message: message.into() }
    }

    /// A warning at a location.
    pub fn warning(location: Option<Location>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, location, message: message.into() }
    }

    /// Whether this is an error (rejects the graph).
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        write!(f, "{}: {}", self.severity, self.message)
    }
}

/// A rejected graph: every diagnostic the checker found (errors first in source order, then
/// warnings). Displays one diagnostic per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Sorts diagnostics by file, line, column (located ones first), keeping the order of equals.
pub(crate) fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| match (&a.location, &b.location) {
        (Some(x), Some(y)) => x.cmp(y),
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, None) => std::cmp::Ordering::Equal,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let src = SourceFile::new("f.toml", "ab\né = 1\nx", ".");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(1), (1, 2));
        assert_eq!(src.line_col(3), (2, 1));
        // 'é' is two bytes: the '=' after "é " is column 3.
        assert_eq!(src.line_col(6), (2, 3));
        assert_eq!(src.line_col(src.text.len()), (3, 2));
    }
}
