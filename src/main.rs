//! The `maas` command line: check, draw and run pipeline graphs.
//!
//! Machine output (JSON, DOT) goes to stdout only; logs and diagnostics go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use maas_engine::{Sequential, json};
use maas_graphs::{Diagnostics, PortType};
use maas_kernels::{Registry, Values};

/// Serve machine-learning models as checked compositions of submodels.
#[derive(Parser)]
#[command(name = "maas", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check graph files; print every problem as `file:line:col: error: message`.
    ///
    /// The files are checked together, as `serve` would load them: names are shared across them.
    /// Exits 0 when they are sound (warnings are printed but do not fail), 1 otherwise.
    Validate {
        /// Graph files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a pipeline as a Graphviz DOT digraph.
    Graph {
        /// Graph files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline to draw.
        #[arg(long)]
        pipeline: String,
    },
    /// Run a pipeline once and print `{"outputs": {...}, "model_versions": {...}}`.
    Run {
        /// Graph files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline to run.
        #[arg(long)]
        pipeline: String,
        /// An input as NAME=VALUE: VALUE is JSON (nested arrays for tensors, a string or list
        /// of strings for text), a plain string for a text input, or @FILE with JSON in it.
        #[arg(long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads graph files; on rejection prints every diagnostic and fails.
fn load(files: &[PathBuf], registry: &Registry) -> anyhow::Result<maas_graphs::Checked> {
    match maas_engine::load_files(files, registry) {
        Ok(checked) => {
            for w in &checked.warnings {
                eprintln!("{w}");
            }
            Ok(checked)
        }
        Err(diags) => {
            print_diagnostics(&diags);
            bail!("{} rejected with {} error(s)", describe(files), diags.errors().count())
        }
    }
}

fn print_diagnostics(diags: &Diagnostics) {
    for d in &diags.0 {
        eprintln!("{d}");
    }
}

fn describe(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        many => format!("{} graph files", many.len()),
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let registry = Registry::builtin();
    match command {
        Command::Validate { files } => match maas_engine::load_files(&files, &registry) {
            Ok(checked) => {
                for w in &checked.warnings {
                    eprintln!("{w}");
                }
                eprintln!(
                    "{}: ok ({} submodels, {} pipelines)",
                    describe(&files),
                    checked.graph.submodels.len(),
                    checked.graph.pipelines.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(diags) => {
                print_diagnostics(&diags);
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Graph { files, pipeline } => {
            let checked = load(&files, &registry)?;
            let p = checked
                .graph
                .pipelines
                .get(pipeline.as_str())
                .with_context(|| format!("no pipeline `{pipeline}` in {}", describe(&files)))?;
            println!("{}", maas_graphs::to_dot(&checked.graph, p));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { files, pipeline, inputs } => {
            let checked = load(&files, &registry)?;
            let p = checked
                .graph
                .pipelines
                .get(pipeline.as_str())
                .with_context(|| format!("no pipeline `{pipeline}` in {}", describe(&files)))?;
            let mut values = Values::new();
            for arg in &inputs {
                let (name, raw) = arg.split_once('=').with_context(|| format!("--input `{arg}` is not NAME=VALUE"))?;
                let input = p.inputs.iter().find(|i| i.name.as_str() == name).with_context(|| {
                    let known: Vec<&str> = p.inputs.iter().map(|i| i.name.as_str()).collect();
                    format!("pipeline `{pipeline}` has no input `{name}`; it takes: {}", known.join(", "))
                })?;
                let text = match raw.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                    None => raw.to_string(),
                };
                let parsed = match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(j) => j,
                    Err(_) if input.ty == PortType::Text => serde_json::Value::String(text),
                    Err(e) => bail!("--input {name}: not valid JSON: {e}"),
                };
                values.insert(name.to_string(), json::value_from_json(name, &input.ty, &parsed)?);
            }
            let engine = Sequential::new(&checked.graph, &registry)?;
            let outputs = engine.run(&pipeline, values)?;
            let mut out = serde_json::Map::new();
            for (name, v) in &outputs {
                out.insert(name.clone(), json::value_to_json(v)?);
            }
            let report = serde_json::json!({ "outputs": out, "model_versions": engine.versions(p) });
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
