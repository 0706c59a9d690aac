//! How the `maas` binary logs: tracing events and its own status lines, all on stderr.
//!
//! - Which events: `RUST_LOG` (an `EnvFilter`; default `warn`).
//! - [`LogFormat::Text`] (the default): human-readable lines, coloured only when stderr is a
//!   terminal and `NO_COLOR` is unset or empty, so logs redirected to a file or a pipe carry no
//!   escape codes.
//! - [`LogFormat::Json`]: one JSON object per line, for log collectors:
//!   `{"timestamp": "...", "level": "WARN", "message": "...", "target": "...", ...}` (the event's
//!   fields beside `message`; `span`/`spans` when inside spans).
//!
//! Status lines (`maas: watching ...`, `bench: change 0 ...`) are printed whatever `RUST_LOG`
//! says: as `maas: ...` in text, as an `INFO` object with target `maas` in JSON ([`notice`]).

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Whether text logs are coloured: only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global tracing subscriber writing to stderr in `format`, filtered by
/// `RUST_LOG` (default `warn`). Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => {
            let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
            builder.with_ansi(colour).init();
        }
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// Prints a status line of the binary's own on stderr: `maas: {message}` as text, or a JSON
/// object shaped like the JSON log lines (level `INFO`, target `maas`).
pub fn notice(message: impl Display) {
    notice_as("maas", message);
}

/// [`notice`] from another part (`bench`): `{source}: {message}`, or target `source` in JSON.
pub fn notice_as(source: &str, message: impl Display) {
    match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => eprintln!("{source}: {message}"),
        LogFormat::Json => {
            let mut timestamp = String::new();
            let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
            // The keys in the order tracing's JSON lines have them.
            let text = |s: &str| serde_json::Value::from(s).to_string();
            eprintln!(
                r#"{{"timestamp":{},"level":"INFO","message":{},"target":{}}}"#,
                text(&timestamp),
                text(&message.to_string()),
                text(source)
            );
        }
    }
}

/// Names as a plain list: `a, b`.
pub fn list<T: Display>(names: &[T]) -> String {
    names.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// What a recomposition changed, in words: `submodels added: top; pipelines changed: classify`
/// (what is empty is left out; `nothing` when all is).
pub fn describe_diff(diff: &maas_graphs::GraphDiff) -> String {
    let (s, p) = (&diff.submodels, &diff.pipelines);
    let groups = [
        ("submodels added", list(&s.added)),
        ("submodels changed", list(&s.changed)),
        ("submodels removed", list(&s.removed)),
        ("pipelines added", list(&p.added)),
        ("pipelines changed", list(&p.changed)),
        ("pipelines removed", list(&p.removed)),
    ];
    let said: Vec<String> = groups
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what}: {names}"))
        .collect();
    if said.is_empty() { "nothing".to_string() } else { said.join("; ") }
}
