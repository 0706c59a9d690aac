//! The state directory: every applied change is recorded there, so that a restarted engine serves
//! the same graph and versions (and can still roll back).
//!
//! One file, `state.json`, written whole to a temporary file, flushed to disk and renamed over
//! the old one (then the directory is flushed): a crash leaves the old record or the new one,
//! never half of either. It holds the served graph as TOML (the graph language, paths resolved),
//! each submodel's kept versions as one-submodel graphs (so restoring is checking), with whether
//! a rollback left them, and every version label with the content it names (so a label stays
//! taken across restarts). Records written before labels were kept restore with the labels of
//! their serving and kept versions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use maas_graphs::{Graph, SourceFile};
use maas_kernels::Registry;
use serde_json::{Value as Json, json};

use crate::change::{Content, FileStamp, History, PastVersion};
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
    let stamps_json = |stamps: &[FileStamp]| -> Vec<Json> {
        stamps
            .iter()
            .map(|s| json!({"path": s.path, "size": s.size, "modified_ns": s.modified_ns.to_string()}))
            .collect()
    };
    let history: serde_json::Map<String, Json> = served
        .history
        .past
        .iter()
        .map(|(name, past)| {
            let entries = past
                .iter()
                .map(|p| {
                    let mut one = Graph::default();
                    one.submodels.insert(p.spec.name.clone(), p.spec.normalized());
                    json!({
                        "graph": maas_graphs::to_toml(&one),
                        "since_ms": millis(p.since),
                        "until_ms": millis(p.until),
                        "files": stamps_json(&p.stamps),
                        "left_by_rollback": p.left_by_rollback,
                    })
                })
                .collect();
            (name.clone(), Json::Array(entries))
        })
        .collect();
    let mut labels = serde_json::Map::new();
    for (name, named) in &served.history.labels {
        let mut one = serde_json::Map::new();
        for (label, c) in named {
            let params = toml::to_string(&c.params).map_err(|e| format!("params of `{name}` {label}: {e}"))?;
            one.insert(
                label.clone(),
                json!({ "kind": c.kind, "weights": c.weights, "params": params, "files": stamps_json(&c.files) }),
            );
        }
        labels.insert(name.clone(), Json::Object(one));
    }
    let record = json!({
        "format": FORMAT,
        "revision": revision,
        "saved_ms": millis(SystemTime::now()),
        "graph": maas_graphs::to_toml(&graph),
        "history": history,
        "labels": labels,
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
    let stamps_of = |files: &Json| -> Vec<FileStamp> {
        files
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
            .collect()
    };
    let mut history = History::default();
    if let Some(h) = record["history"].as_object() {
        for (submodel, entries) in h {
            let mut past = Vec::new();
            for e in entries.as_array().into_iter().flatten() {
                let text = e["graph"].as_str().unwrap_or_default();
                let source = SourceFile::new(format!("{} (history of {submodel})", path.display()), text, "");
                match maas_graphs::check(vec![source], registry) {
                    Ok(c) => {
                        if let Some(spec) = c.graph.submodels.into_values().next() {
                            past.push(PastVersion {
                                spec: Arc::new(spec),
                                since: time(e["since_ms"].as_u64()),
                                until: time(e["until_ms"].as_u64()),
                                stamps: stamps_of(&e["files"]),
                                left_by_rollback: e["left_by_rollback"].as_bool().unwrap_or(false),
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
                history.past.insert(submodel.clone(), past);
            }
        }
    }
    if let Some(l) = record["labels"].as_object() {
        for (submodel, named) in l.iter().filter(|(s, _)| checked.graph.submodels.contains_key(s.as_str())) {
            for (label, c) in named.as_object().into_iter().flatten() {
                let params = match c["params"].as_str().map(toml::from_str::<toml::Table>) {
                    Some(Ok(p)) => p,
                    _ => return Err(bad(format!("the params of version `{label}` of `{submodel}` do not parse"))),
                };
                let content = Content {
                    kind: c["kind"].as_str().unwrap_or_default().to_string(),
                    weights: c["weights"].as_str().map(PathBuf::from),
                    params,
                    files: stamps_of(&c["files"]),
                };
                history.labels.entry(submodel.clone()).or_default().insert(label.clone(), content);
            }
        }
    }
    // Kept versions name what they served (records from before labels were kept).
    for p in history.past.values().flatten() {
        if !history.labels.get(p.spec.name.as_str()).is_some_and(|l| l.contains_key(&p.spec.version)) {
            let content = Content::new(&p.spec, &p.stamps);
            history.labels.entry(p.spec.name.to_string()).or_default().insert(p.spec.version.clone(), content);
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
