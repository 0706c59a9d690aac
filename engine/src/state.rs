//! The state directory: every applied change is recorded there, so that a restarted engine serves
//! the same graph and versions (and can still roll back).
//!
//! One file, `state.json`, written whole to a temporary file, flushed to disk and renamed over
//! the old one (then the directory is flushed): a crash leaves the old record or the new one,
//! never half of either. It holds the served graph as TOML (the graph language, paths resolved)
//! and each submodel's previous versions as one-submodel graphs, so restoring is checking.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use maas_graphs::{Graph, SourceFile};
use maas_kernels::Registry;
use serde_json::{Value as Json, json};

use crate::change::{FileStamp, History, PastVersion};
use crate::engine::Served;

/// The record's file name in the state directory.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u64 = 1;

/// What a state directory recorded.
pub(crate) struct Restored {
    pub(crate) dir: PathBuf,
    pub(crate) graph: Graph,
    pub(crate) history: History,
    pub(crate) revision: u64,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn time(ms: Option<u64>) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.unwrap_or(0))
}

/// Records what `served` serves, atomically.
pub(crate) fn save(dir: &Path, served: &Served, revision: u64) -> Result<(), String> {
    // Canonical, absolute file paths: the record means the same from any working directory.
    let mut graph = served.graph.clone();
    for spec in graph.submodels.values_mut() {
        *spec = spec.normalized();
    }
    let history: serde_json::Map<String, Json> = served
        .history
        .iter()
        .map(|(name, past)| {
            let entries = past
                .iter()
                .map(|p| {
                    let mut one = Graph::default();
                    one.submodels.insert(p.spec.name.clone(), p.spec.normalized());
                    let stamps: Vec<Json> = p
                        .stamps
                        .iter()
                        .map(|s| json!({"path": s.path, "size": s.size, "modified_ns": s.modified_ns.to_string()}))
                        .collect();
                    json!({
                        "graph": maas_graphs::to_toml(&one),
                        "since_ms": millis(p.since),
                        "until_ms": millis(p.until),
                        "files": stamps,
                    })
                })
                .collect();
            (name.clone(), Json::Array(entries))
        })
        .collect();
    let record = json!({
        "format": FORMAT,
        "revision": revision,
        "saved_ms": millis(SystemTime::now()),
        "graph": maas_graphs::to_toml(&graph),
        "history": history,
    });
    let text = serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?;
    let io = |what: &str, e: std::io::Error| format!("{what} in `{}`: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create the state directory", e))?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write", e))?;
        f.write_all(text.as_bytes()).map_err(|e| io("cannot write", e))?;
        f.sync_all().map_err(|e| io("cannot flush", e))?;
    }
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| io("cannot replace the record", e))?;
    // Make the rename itself durable (best effort where directories cannot be opened).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the record in `dir`, if there is one. A record that does not check any more (a file it
/// names is gone) is an error: serving something else silently would be worse.
pub(crate) fn restore(dir: &Path, registry: &Registry) -> Result<Option<Restored>, String> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read `{}`: {e}", path.display())),
    };
    let bad = |why: String| format!("`{}`: {why} (move it away to serve the graph files as written)", path.display());
    let record: Json = serde_json::from_str(&text).map_err(|e| bad(format!("not a state record: {e}")))?;
    if record["format"].as_u64() != Some(FORMAT) {
        return Err(bad(format!("unknown format {}", record["format"])));
    }
    let graph_text = record["graph"].as_str().ok_or_else(|| bad("no `graph`".into()))?;
    let name = format!("{} (graph)", path.display());
    let checked = maas_graphs::check(vec![SourceFile::new(name, graph_text, "")], registry)
        .map_err(|d| bad(format!("the recorded graph does not check any more:\n{d}")))?;
    let mut history = History::new();
    if let Some(h) = record["history"].as_object() {
        for (submodel, entries) in h {
            let mut past = Vec::new();
            for e in entries.as_array().into_iter().flatten() {
                let text = e["graph"].as_str().unwrap_or_default();
                let source = SourceFile::new(format!("{} (history of {submodel})", path.display()), text, "");
                match maas_graphs::check(vec![source], registry) {
                    Ok(c) => {
                        if let Some(spec) = c.graph.submodels.into_values().next() {
                            let stamps = e["files"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|f| {
                                    Some(FileStamp {
                                        path: PathBuf::from(f["path"].as_str()?),
                                        size: f["size"].as_u64()?,
                                        modified_ns: f["modified_ns"].as_str()?.parse().ok()?,
                                    })
                                })
                                .collect();
                            past.push(PastVersion {
                                spec: Arc::new(spec),
                                since: time(e["since_ms"].as_u64()),
                                until: time(e["until_ms"].as_u64()),
                                stamps,
                            });
                        }
                    }
                    Err(d) => tracing::warn!(
                        submodel = %submodel, "a recorded previous version does not check any more and cannot be rolled back to:\n{d}"
                    ),
                }
            }
            past.retain(|p| checked.graph.submodels.contains_key(p.spec.name.as_str()));
            if !past.is_empty() {
                history.insert(submodel.clone(), past);
            }
        }
    }
    Ok(Some(Restored {
        dir: dir.to_path_buf(),
        graph: checked.graph,
        history,
        revision: record["revision"].as_u64().unwrap_or(0),
    }))
}

/// Whether `dir` holds a record.
pub fn has_record(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file()
}
