//! Why a path named as a file cannot be read as one, in words for a diagnostic.

use std::path::Path;

/// What is wrong with `path` as a file to read, or `None` when it is a regular file (symlinks
/// followed). Only metadata is read: a FIFO is never opened (opening one would block until a
/// writer came), so it is reported as what it is.
///
/// The words fit after the path: "`x.safetensors` does not exist", "... is not a regular file
/// (a FIFO)".
pub fn file_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some("does not exist".into()),
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    let ty = meta.file_type();
    if ty.is_file() {
        return None;
    }
    let what = if ty.is_dir() { "a directory" } else { special_file(&ty) };
    Some(format!("is not a regular file ({what})"))
}

#[cfg(unix)]
fn special_file(ty: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ty.is_fifo() {
        "a FIFO"
    } else if ty.is_socket() {
        "a socket"
    } else if ty.is_block_device() {
        "a block device"
    } else if ty.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn special_file(_: &std::fs::FileType) -> &'static str {
    "a special file"
}
