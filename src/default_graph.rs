//! The pipelines `maas serve` runs when no graph is given: the committed digits model as
//! `classify` (embedded in the binary, so it works anywhere, offline), plus the MiniLM pipelines
//! `embed` and `similarity` when the model has been fetched into `./models`.

use std::path::{Path, PathBuf};

use maas_graphs::SourceFile;

const DIGITS_TOML: &str = include_str!("../examples/pipelines/digits.toml");
const FEATURES: &[u8] = include_bytes!("../assets/digits/features.safetensors");
const HEAD: &[u8] = include_bytes!("../assets/digits/head.safetensors");
const MINILM_TOML: &str = include_str!("../examples/pipelines/minilm.toml");

/// Writes the embedded digits model under `dir` and returns the default graph sources; the
/// MiniLM graph is included when `models_root/models/all-MiniLM-L6-v2` holds the model.
pub fn sources(dir: &Path, models_root: &Path) -> std::io::Result<Vec<SourceFile>> {
    let assets = dir.join("assets/digits");
    std::fs::create_dir_all(&assets)?;
    write_if_changed(&assets.join("features.safetensors"), FEATURES)?;
    write_if_changed(&assets.join("head.safetensors"), HEAD)?;
    // The graph's weight paths are `../../assets/digits/...`, relative to examples/pipelines/.
    let pipelines_dir = dir.join("examples/pipelines");
    std::fs::create_dir_all(&pipelines_dir)?;
    let mut sources = vec![SourceFile::new("<embedded>/digits.toml", DIGITS_TOML, pipelines_dir)];
    if minilm_present(models_root) {
        sources.push(SourceFile::new("<embedded>/minilm.toml", MINILM_TOML, models_root.join("examples/pipelines")));
    }
    Ok(sources)
}

/// Writes `bytes` unless the file holds them already (a restart keeps the files, and their
/// modification times, that a state directory's record names).
fn write_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes)
}

/// Whether the MiniLM model files are under `root/models/all-MiniLM-L6-v2`.
pub fn minilm_present(root: &Path) -> bool {
    let m = root.join("models/all-MiniLM-L6-v2");
    ["model.safetensors", "config.json", "tokenizer.json"].iter().all(|f| m.join(f).is_file())
}

/// A fresh directory for the embedded assets of this process.
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("maas-default-{}", std::process::id()))
}
