//! The `maas` command line: check, draw and run pipeline graphs.
//!
//! Machine output (JSON, DOT) goes to stdout only; logs and diagnostics go to stderr.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use maas::bench::{self, BenchConfig};
use maas::logging::{self, LogFormat};
use maas_engine::{Engine, Sequential, json};
use maas_graphs::{Diagnostics, Pipeline, PortType, SourceFile};
use maas_kernels::{Registry, Values};

/// Serve machine-learning models as checked compositions of submodels.
#[derive(Parser)]
#[command(name = "maas", version, about)]
struct Cli {
    /// How logs look on stderr: `text` (coloured only on a terminal, never with `NO_COLOR`) or
    /// `json` (one object per line). Which logs: `RUST_LOG` (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
    /// Run a training job (`[training.NAME]` in the graph files): print its progress on stderr
    /// and one JSON report on stdout; write the trained submodels' weights into `--out`.
    Train {
        /// Graph files (TOML) holding the job, its pipeline and submodels.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The job to run.
        #[arg(long)]
        job: String,
        /// Data-parallel workers (overrides the job's `workers`).
        #[arg(long)]
        workers: Option<usize>,
        /// Parameter servers (overrides `servers`).
        #[arg(long)]
        servers: Option<usize>,
        /// `sync` or `async` (overrides `mode`).
        #[arg(long)]
        mode: Option<String>,
        /// Async: how many versions a gradient may be behind (overrides `staleness`).
        #[arg(long)]
        staleness: Option<u64>,
        /// `none`, `topk:DENSITY`, `int8` or `sign` (overrides `compression`).
        #[arg(long)]
        compression: Option<String>,
        /// Turn error feedback off.
        #[arg(long)]
        no_error_feedback: bool,
        /// Passes over the training rows (overrides `epochs`).
        #[arg(long)]
        epochs: Option<usize>,
        /// Seed of the init and batch order (overrides `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// After training, zero this fraction (0..1) of each learning weight matrix (the
        /// smallest in magnitude) and fine-tune with them held at zero (overrides `prune`).
        #[arg(long, value_name = "SPARSITY")]
        prune: Option<f64>,
        /// Epochs of the fine-tune after pruning (overrides `prune_epochs`).
        #[arg(long)]
        prune_epochs: Option<usize>,
        /// Where the trained weights are written (`<submodel>.safetensors`); default
        /// `trained/<job>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Then hot-swap the trained submodels into the `maas serve` at URL through its admin API
        /// (token from MAAS_ADMIN_TOKEN; the server must accept files from `--out`, e.g. with
        /// `--model-root`), only if the held-out accuracy reaches the job's `min_accuracy`.
        /// Several learning submodels are swapped together (`POST /v1/swaps`).
        #[arg(long, value_name = "URL")]
        swap_into: Option<String>,
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
    /// Serve pipelines over HTTP (maas's JSON API and the Open Inference Protocol, KServe v2) and
    /// gRPC (`inference.GRPCInferenceService`, same address): the given graphs, or the embedded
    /// default pipelines.
    ///
    /// Without graph files it serves the committed digits model as `classify`, and the MiniLM
    /// pipelines `embed` and `similarity` when `./models` holds the fetched model. Admin routes
    /// need `MAAS_ADMIN_TOKEN`. SIGINT/SIGTERM: stop accepting, give requests in flight
    /// --shutdown-grace to finish, close what is left, exit 0.
    Serve {
        /// Graph files (TOML); none: the embedded default pipelines.
        files: Vec<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = maas::http::DEFAULT_MAX_BODY)]
        max_body: usize,
        /// Most rows in one request.
        #[arg(long, default_value_t = maas::http::DEFAULT_MAX_ROWS)]
        max_rows: usize,
        /// Record every change (swap, rollback, recomposition) here, and come back serving the
        /// recorded graph and versions after a restart.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// A directory swaps and recompositions may read weights from, besides the graph files'
        /// directories (repeatable).
        #[arg(long = "model-root", value_name = "DIR")]
        model_roots: Vec<PathBuf>,
        /// Watch the graph files: a change is checked and applied as a recomposition (an
        /// invalid one is logged, and the served graph stays).
        #[arg(long)]
        watch: bool,
        /// Where training jobs started on the server (`POST /v1/training/{job}`) write their
        /// weights (`<DIR>/<job>-<unix ms>/`); swaps may read from it. Default: `training` in
        /// --state-dir, else `./trained`. Created when the graph files define a job.
        #[arg(long, value_name = "DIR")]
        training_dir: Option<PathBuf>,
        /// The most memory loading may take (the graph at start, and each swap, rollback or
        /// recomposition): bytes, or with a unit (512MiB, 8GiB). Loads estimated above it, or
        /// above the memory available, are refused. Default: half the machine's memory.
        #[arg(long, value_name = "SIZE", value_parser = maas::engine::parse_bytes)]
        max_load_memory: Option<u64>,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Host submodels for serving processes: graphs that declare this node (`[nodes.NAME]
    /// addr = "HOST:PORT"`) and place submodels on it (`node = "NAME"`) run them here.
    ///
    /// Peers authenticate with the shared secret in MAAS_CLUSTER_SECRET (required); weights are
    /// read from this machine, only under the --model-root directories.
    Node {
        /// This node's name, as graphs declare it.
        #[arg(long)]
        name: String,
        /// Where to listen (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: std::net::SocketAddr,
        /// A directory submodels' files may be read from (repeatable; default: the working
        /// directory).
        #[arg(long = "model-root", value_name = "DIR")]
        model_roots: Vec<PathBuf>,
        /// The largest frame a peer may send, in bytes or with a unit (64MiB); a larger one
        /// closes that peer's connection.
        #[arg(long, value_name = "SIZE", value_parser = maas::engine::parse_bytes, default_value = "64MiB")]
        max_frame: u64,
    },
    /// Drive a pipeline (in process, or a server with --url) and print throughput and latency
    /// percentiles as JSON.
    Bench {
        /// Graph files (TOML); not needed with --url.
        #[arg(required_unless_present = "url")]
        files: Vec<PathBuf>,
        /// Drive a running server over HTTP instead (e.g. http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
        /// With --url: the protocol to speak: maas's JSON API (`json`), the Open Inference
        /// Protocol over HTTP with JSON data (`v2`) or binary tensor data (`v2-binary`), or over
        /// gRPC (`grpc`). Every request is encoded once, before the load starts.
        #[arg(long, value_enum, default_value_t = bench::Protocol::Json, requires = "url")]
        protocol: bench::Protocol,
        /// The pipeline to drive.
        #[arg(long)]
        pipeline: String,
        /// Concurrent callers (closed loop).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Requests per second: an open loop instead (latency from the scheduled send time).
        #[arg(long)]
        rate: Option<f64>,
        /// Inputs of every request, as for `run`.
        #[arg(long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// Also measure the bare kernels (sequential executor, one batch of `concurrency`
        /// requests' rows) in the same run, and report the ratio (with --url: needs the graph
        /// files too).
        #[arg(long)]
        baseline: bool,
        /// Hot-swap SUBMODEL to WEIGHTS (and/or to --swap-params) while the load runs, then
        /// roll it back, alternately (with --url: through the admin API, token from
        /// MAAS_ADMIN_TOKEN), and report the latency of the second around each change against
        /// the steady state.
        #[arg(long, value_name = "SUBMODEL[=WEIGHTS]")]
        swap: Option<String>,
        /// Params the swaps set, as a JSON object (e.g. '{"seed": 2}'); with `--swap SUBMODEL`
        /// alone, a params-only swap.
        #[arg(long, value_name = "JSON", requires = "swap")]
        swap_params: Option<String>,
        /// Seconds between changes with --swap.
        #[arg(long, default_value_t = 2.0)]
        swap_every: f64,
    },
}

fn main() -> ExitCode {
    fix_thread_count();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs this program again with candle's CPU threading set, when the environment does not set
/// it (only the environment a process starts with can be set safely, hence the `exec`: same
/// process id, arguments and limits; if it fails, the program carries on as it is):
/// - `RAYON_NUM_THREADS`, to the count candle would use (the physical cores): candle asks for
///   its thread count on every CPU operation and, without the variable, counts the cores by
///   reading `/proc/cpuinfo` each time. On 2 cores the digits CNN's batch of 64 rows took
///   4.8 ms without it, 2.6 ms with it.
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT`, on machines of at most 4 physical cores, to 5,000
///   (candle's default is 25,000): after each operation candle's pool threads spin that long
///   for the next one, taking a core from the streams and tasks that have work. On 2 cores
///   this made the digits batch 2.0 ms instead of 2.6 ms and MiniLM's batch of 32 sentences
///   86 ms instead of 117 ms.
/// - `GLIBC_TUNABLES` (glibc only; ignored by other C libraries), so that freed buffers of up to
///   32 MiB stay in the heap for the next batch instead of going back to the kernel: glibc
///   otherwise maps every buffer over 128 KiB afresh (a page fault per 4 KiB on first touch);
///   an encoder allocates a few MiB per layer per batch, and the faults were about 13% of the
///   `bert` kind's batch of 32 (82 ms instead of 95). The memory stays with the process.
#[cfg(unix)]
fn fix_thread_count() {
    use std::os::unix::process::CommandExt;
    let cores = num_cpus::get_physical().max(1);
    let mut set: Vec<(&str, String)> = Vec::new();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        set.push(("RAYON_NUM_THREADS", cores.to_string()));
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() && cores <= 4 {
        set.push(("CANDLE_BARRIER_POOL_SPIN_LIMIT", "5000".into()));
    }
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        set.push(("GLIBC_TUNABLES", MALLOC_TUNABLES.into()));
    }
    if set.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let error = std::process::Command::new(exe)
        .arg0(std::env::args_os().next().unwrap_or_default())
        .args(std::env::args_os().skip(1))
        .envs(set.iter().map(|(k, v)| (k, v)))
        .exec();
    eprintln!("warning: could not restart with candle's threading set ({error}); CPU kernels run slower");
}

/// Heap buffers up to 32 MiB (glibc's largest mmap threshold), and no trimming of the heap's top
/// below 256 MiB of free space.
#[cfg(unix)]
const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456";

/// Elsewhere the environment is left as it is (set `RAYON_NUM_THREADS` yourself).
#[cfg(not(unix))]
fn fix_thread_count() {}

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

/// `maas serve`'s connection limits and timeouts (seconds may be fractional).
#[derive(clap::Args)]
struct ServeLimits {
    /// Seconds a request's header may take to arrive (a connection's first request: from its
    /// opening; later ones: from their first byte); slower: the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = maas::server::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
    header_timeout: f64,
    /// Seconds a request's whole body may take to arrive; slower: 408 and the connection closes.
    #[arg(long, value_name = "SECS", default_value_t = maas::http::DEFAULT_BODY_TIMEOUT.as_secs_f64())]
    body_timeout: f64,
    /// Seconds a keep-alive connection may stay open between requests.
    #[arg(long, value_name = "SECS", default_value_t = maas::server::DEFAULT_IDLE_TIMEOUT.as_secs_f64())]
    idle_timeout: f64,
    /// Most connections open at once; more are answered 503 and closed [default: the
    /// file-descriptor limit less 96].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// After SIGINT/SIGTERM, seconds requests in flight get to finish; then every connection
    /// still open is closed and the process exits 0.
    #[arg(long, value_name = "SECS", default_value_t = maas::server::DEFAULT_SHUTDOWN_GRACE.as_secs_f64())]
    shutdown_grace: f64,
    /// Most bytes of request bodies held at once, over every connection and HTTP/2 stream (at
    /// least --max-body); a body that would go over is answered 503 `overloaded`.
    #[arg(long, value_name = "BYTES", default_value_t = maas::http::DEFAULT_BODY_MEMORY)]
    max_body_memory: usize,
}

impl ServeLimits {
    fn server_config(&self) -> anyhow::Result<maas::server::ServerConfig> {
        let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                bail!("--{name} must be a number of seconds above 0 and at most 86400, not {v}");
            }
            Ok(Duration::from_secs_f64(v))
        };
        let max_connections = self.max_connections.unwrap_or_else(maas::server::default_max_connections);
        if max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        Ok(maas::server::ServerConfig {
            header_timeout: secs("header-timeout", self.header_timeout)?,
            idle_timeout: secs("idle-timeout", self.idle_timeout)?,
            max_connections,
            shutdown_grace: secs("shutdown-grace", self.shutdown_grace)?,
        })
    }
}

/// `maas serve`'s settings.
struct ServeArgs {
    files: Vec<PathBuf>,
    addr: String,
    max_body: usize,
    max_rows: usize,
    state_dir: Option<PathBuf>,
    model_roots: Vec<PathBuf>,
    watch: bool,
    training_dir: Option<PathBuf>,
    max_load_memory: Option<u64>,
    limits: ServeLimits,
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let ServeArgs {
        files,
        addr,
        max_body,
        max_rows,
        state_dir,
        model_roots,
        watch,
        training_dir,
        max_load_memory,
        limits,
    } = args;
    // The graph files' training jobs, checked like `maas validate` checks them.
    let registry = Registry::builtin();
    let jobs = if files.is_empty() {
        Vec::new()
    } else {
        let checked = load(&files, &registry)?;
        match training_jobs(&files, &checked, &registry)? {
            Some(jobs) => jobs,
            None => return Ok(ExitCode::FAILURE),
        }
    };
    let training_dir = training_dir
        .unwrap_or_else(|| state_dir.as_ref().map_or_else(|| PathBuf::from("trained"), |d| d.join("training")));
    let server_config = limits.server_config()?;
    if !(limits.body_timeout.is_finite() && limits.body_timeout > 0.0 && limits.body_timeout <= 86_400.0) {
        bail!("--body-timeout must be a number of seconds above 0 and at most 86400, not {}", limits.body_timeout);
    }
    runtime()?.block_on(async {
        // Changes may read files under the graph files' directories and the model roots.
        let mut roots = model_roots;
        let mut options = maas::engine::EngineOptions { state_dir: state_dir.clone(), ..engine_options() };
        if max_load_memory.is_some() {
            options.max_load_bytes = max_load_memory;
        }
        match &state_dir {
            Some(dir) if maas::engine::has_record(dir) => logging::notice(format_args!(
                "serving the graph and versions recorded in {} (delete it to serve the graph files as written)",
                dir.join(maas::engine::STATE_FILE).display()
            )),
            Some(dir) => logging::notice(format_args!("recording changes in {}", dir.display())),
            None => logging::notice(format_args!(
                "no --state-dir: swaps, rollbacks and recompositions last until this process stops; a restart serves the graph files as written"
            )),
        }
        // What --watch compares against: the files' text as the engine reads them.
        let texts = read_texts(&files);
        let engine = if files.is_empty() {
            let cwd = std::env::current_dir()?;
            // With a state directory, the embedded assets get a stable home the record can name.
            let assets = state_dir.as_ref().map_or_else(maas::default_graph::scratch_dir, |d| d.join("default"));
            let sources = maas::default_graph::sources(&assets, &cwd)?;
            roots.push(assets);
            if maas::default_graph::minilm_present(&cwd) {
                roots.push(cwd.join("models"));
            } else {
                logging::notice(format_args!("./models has no MiniLM model: serving `classify` only (run scripts/fetch-models for `embed` and `similarity`)"));
            }
            options.file_roots = Some(roots);
            Engine::builder().options(options).from_sources(sources).await?
        } else {
            for f in &files {
                let dir = f.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                roots.push(dir.to_path_buf());
            }
            if !jobs.is_empty() {
                std::fs::create_dir_all(&training_dir)
                    .with_context(|| format!("creating the training directory {}", training_dir.display()))?;
                roots.push(training_dir.clone());
            }
            options.file_roots = Some(roots);
            Engine::builder().options(options).from_files(&files).await?
        };
        if watch {
            if files.is_empty() {
                logging::notice(format_args!("--watch needs graph files; the embedded graph is not watched"));
            } else {
                tokio::spawn(watch_files(engine.clone(), files.clone(), texts));
            }
        }
        let mut config = maas::http::HttpConfig::from_env();
        config.max_body = max_body;
        config.max_rows = max_rows;
        config.body_timeout = Duration::from_secs_f64(limits.body_timeout);
        config.body_memory = limits.max_body_memory;
        if !jobs.is_empty() {
            logging::notice(format_args!(
                "training jobs {} can be started with POST /v1/training/{{job}}; they write into {}",
                jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>().join(", "),
                training_dir.display()
            ));
        }
        config.training_jobs = std::sync::Arc::new(jobs.into_iter().map(|j| (j.name.clone(), j)).collect());
        config.training_dir = training_dir;
        if config.admin_token.is_none() {
            logging::notice(format_args!("admin routes disabled (set MAAS_ADMIN_TOKEN to enable them)"));
        }
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let names: Vec<String> = engine.pipelines().into_iter().map(|p| p.name).collect();
        let stop = shutdown_signal();
        logging::notice(format_args!("serving {} on http://{}", names.join(", "), listener.local_addr()?));
        let metrics = config.metrics.clone();
        let router = maas::http::router_with(engine.clone(), config);
        let grace = server_config.shutdown_grace;
        let stopping = async {
            stop.await;
            logging::notice(format_args!("stopped accepting; requests in flight get {grace:?} to finish"));
        };
        maas::server::serve(listener, router, server_config, metrics, stopping).await?;
        logging::notice(format_args!("connections closed; draining the engine"));
        let left = engine.shutdown().await;
        if left > 0 {
            logging::notice(format_args!("{left} requests were still running at the drain timeout"));
        }
        logging::notice(format_args!("stopped"));
        Ok(ExitCode::SUCCESS)
    })
}

fn read_texts(files: &[PathBuf]) -> Vec<Option<String>> {
    files.iter().map(|f| std::fs::read_to_string(f).ok()).collect()
}

/// Polls the graph files once a second; when their text differs from `seen`, applies them as a
/// recomposition (the operator's own files: not confined to the file roots). A watched file
/// is the truth: submodels swapped through the API since go back to the file's definition.
async fn watch_files(engine: Engine, files: Vec<PathBuf>, mut seen: Vec<Option<String>>) {
    logging::notice(format_args!("watching {} for changes", describe(&files)));
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read_texts(&files);
        if now == seen || now.iter().any(Option::is_none) {
            continue; // unchanged, or a file is being replaced: look again next time
        }
        // Check exactly the text just compared, so a file replaced meanwhile is not half-read.
        let sources: Vec<SourceFile> = files
            .iter()
            .zip(&now)
            .map(|(f, text)| {
                let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
                SourceFile::new(f.display().to_string(), text.clone().unwrap_or_default(), dir)
            })
            .collect();
        seen = now;
        match engine.recompose_trusted(sources).await {
            Ok(r) if r.applied => {
                logging::notice(format_args!("applied the changed graph: {}", logging::describe_diff(&r.diff)));
                for w in &r.warnings {
                    logging::notice(format_args!("warning: {w}"));
                }
            }
            Ok(_) => logging::notice("the graph files changed but serve the same graph"),
            Err(e) => logging::notice(format_args!("the changed graph was not applied; the served graph stays:\n{e}")),
        }
    }
}

/// `--swap SUBMODEL[=WEIGHTS]` with `--swap-params JSON`.
fn parse_swap(arg: Option<&str>, params: Option<&str>, every: f64) -> anyhow::Result<Option<bench::Swap>> {
    let Some(arg) = arg else { return Ok(None) };
    if !(every.is_finite() && every > 0.0) {
        bail!("--swap-every must be a positive number of seconds");
    }
    bench::Swap::parse(arg, params).map(Some)
}

/// Engine settings from the environment: the cluster secret (`MAAS_CLUSTER_SECRET`), used when a
/// graph places submodels on nodes.
fn engine_options() -> maas::engine::EngineOptions {
    let mut options = maas::engine::EngineOptions::default();
    options.cluster.secret = std::env::var("MAAS_CLUSTER_SECRET").ok().filter(|s| !s.is_empty());
    options
}

/// `maas node`: hosts submodels until SIGINT or SIGTERM.
fn node(
    name: String,
    listen: std::net::SocketAddr,
    model_roots: Vec<PathBuf>,
    max_frame: u64,
) -> anyhow::Result<ExitCode> {
    maas_graphs::check_name(&name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let Some(secret) = std::env::var("MAAS_CLUSTER_SECRET").ok().filter(|s| !s.is_empty()) else {
        bail!(
            "set MAAS_CLUSTER_SECRET to the secret shared by the serving processes and their nodes (a node never runs without one)"
        );
    };
    let model_roots = if model_roots.is_empty() { vec![std::env::current_dir()?] } else { model_roots };
    let config = maas::engine::NodeConfig {
        name: name.clone(),
        listen,
        model_roots: model_roots.clone(),
        secret,
        max_frame,
        options: maas::engine::EngineOptions::default(),
    };
    runtime()?.block_on(async {
        let stop = shutdown_signal();
        let node = maas::engine::Node::start(config, Registry::builtin()).await.map_err(|e| anyhow::anyhow!(e))?;
        let roots = model_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
        logging::notice(format_args!("node `{name}` listening on {listen} (model roots: {roots})"));
        stop.await;
        logging::notice(format_args!("node `{name}` stopping"));
        node.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Listens for SIGINT and SIGTERM from the call on (so a signal sent as soon as the address is
/// printed is not missed); the future resolves on the first.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => {},
                _ = wait(term) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The bare-kernels baseline for a bench: one batch of `concurrency` requests' rows through the
/// sequential executor, for at most 10 s.
fn measure_baseline(
    graph: &maas_graphs::Graph,
    registry: &Registry,
    values: &Values,
    cfg: &BenchConfig,
) -> anyhow::Result<serde_json::Value> {
    let seq = Sequential::new(graph, registry)?;
    let limit = cfg.duration.min(Duration::from_secs(10));
    bench::baseline(&seq, &cfg.pipeline, values, cfg.concurrency.max(1), limit)
}

/// Adds the baseline and the throughput ratio to a bench report.
fn with_baseline(mut report: serde_json::Value, base: Option<serde_json::Value>) -> serde_json::Value {
    if let Some(base) = base {
        let ratio =
            report["throughput_rps"].as_f64().unwrap_or(0.0) / base["requests_per_s"].as_f64().unwrap_or(f64::NAN);
        report["baseline"] = base;
        report["vs_baseline"] = serde_json::json!((ratio * 1000.0).round() / 1000.0);
    }
    report
}

/// The training jobs of graph files already checked (the files read again: they were just
/// read whole, so this fails only in a race); `None` when a job has problems (printed).
fn training_jobs(
    files: &[PathBuf],
    checked: &maas_graphs::Checked,
    registry: &Registry,
) -> anyhow::Result<Option<Vec<maas_train::job::Job>>> {
    let sources = files
        .iter()
        .map(|f| maas_graphs::SourceFile::read(f).with_context(|| format!("reading {}", f.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    match maas_train::job::check(&sources, checked, registry) {
        Ok(jobs) => Ok(Some(jobs)),
        Err(diags) => {
            print_diagnostics(&diags);
            Ok(None)
        }
    }
}

/// `PUT URL/v1/submodels/NAME` with the trained weights as version `version`; the server's
/// answer (`previous`, `version`, ...).
async fn swap_over_http(
    url: &str,
    token: &str,
    weights: &std::collections::BTreeMap<String, PathBuf>,
    version: &str,
) -> anyhow::Result<serde_json::Value> {
    // One submodel: its own swap; several: swapped together (no request sees one new and one old).
    let (endpoint, body) = match weights.iter().collect::<Vec<_>>().as_slice() {
        [(name, path)] => (
            format!("{}/v1/submodels/{name}", url.trim_end_matches('/')),
            serde_json::json!({ "weights": path.display().to_string(), "version": version }),
        ),
        _ => (
            format!("{}/v1/swaps", url.trim_end_matches('/')),
            serde_json::json!({ "submodels": weights.iter().map(|(name, path)| {
                (name.clone(), serde_json::json!({ "weights": path.display().to_string(), "version": version }))
            }).collect::<serde_json::Map<_, _>>() }),
        ),
    };
    let client = reqwest::Client::new();
    let request = if weights.len() == 1 { client.put(&endpoint) } else { client.post(&endpoint) };
    let response = request
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| endpoint.clone())?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.with_context(|| format!("{endpoint}: the answer"))?;
    if !status.is_success() {
        bail!("{endpoint}: {status}: {answer}");
    }
    // As one map: submodel -> the server's answer for it.
    Ok(match weights.keys().next() {
        Some(name) if weights.len() == 1 => serde_json::json!({ name: answer }),
        _ => answer["swapped"].clone(),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn find_pipeline<'g>(graph: &'g maas_graphs::Graph, name: &str, files: &[PathBuf]) -> anyhow::Result<&'g Pipeline> {
    graph.pipelines.get(name).with_context(|| format!("no pipeline `{name}` in {}", describe(files)))
}

/// Parses `--input NAME=VALUE` arguments against a pipeline's declared inputs.
fn parse_inputs(p: &Pipeline, inputs: &[String]) -> anyhow::Result<Values> {
    let mut values = Values::new();
    for arg in inputs {
        let (name, raw) = arg.split_once('=').with_context(|| format!("--input `{arg}` is not NAME=VALUE"))?;
        let input = p.inputs.iter().find(|i| i.name.as_str() == name).with_context(|| {
            let known: Vec<&str> = p.inputs.iter().map(|i| i.name.as_str()).collect();
            format!("pipeline `{}` has no input `{name}`; it takes: {}", p.name, known.join(", "))
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
    Ok(values)
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let mut registry = Registry::builtin();
    if matches!(command, Command::Bench { .. }) {
        // The stand-in for a device of a given speed is offered to benchmarks only.
        registry.register(maas_kernels::FixedCost);
    }
    match command {
        Command::Validate { files } => match maas_engine::load_files(&files, &registry) {
            Ok(checked) => {
                for w in &checked.warnings {
                    eprintln!("{w}");
                }
                let Some(jobs) = training_jobs(&files, &checked, &registry)? else {
                    return Ok(ExitCode::FAILURE);
                };
                let count = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
                let jobs =
                    if jobs.is_empty() { String::new() } else { format!(", {}", count(jobs.len(), "training job")) };
                eprintln!(
                    "{}: ok ({}, {}{jobs})",
                    describe(&files),
                    count(checked.graph.submodels.len(), "submodel"),
                    count(checked.graph.pipelines.len(), "pipeline")
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(diags) => {
                print_diagnostics(&diags);
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Train {
            files,
            job,
            workers,
            servers,
            mode,
            staleness,
            compression,
            no_error_feedback,
            epochs,
            seed,
            prune,
            prune_epochs,
            out,
            swap_into,
        } => {
            let checked = load(&files, &registry)?;
            let Some(jobs) = training_jobs(&files, &checked, &registry)? else {
                return Ok(ExitCode::FAILURE);
            };
            let Some(j) = jobs.into_iter().find(|j| j.name == job) else {
                bail!("no training job `{job}` in {}", describe(&files));
            };
            let overrides = maas_train::job::Overrides {
                workers,
                servers,
                mode,
                staleness,
                compression,
                error_feedback: no_error_feedback.then_some(false),
                epochs,
                seed,
                prune,
                prune_epochs,
            };
            let j = overrides.apply(j).map_err(|e| anyhow::anyhow!("job `{job}`: {e}"))?;
            let token = match &swap_into {
                None => None,
                Some(_) => Some(std::env::var("MAAS_ADMIN_TOKEN").context("--swap-into needs MAAS_ADMIN_TOKEN")?),
            };
            let out = out.unwrap_or_else(|| PathBuf::from("trained").join(&j.name));
            // Progress: a bar over the epochs on a terminal, one line per epoch otherwise.
            let bar = std::io::stderr().is_terminal().then(|| {
                let epochs = j.epochs + if j.prune.is_some() { j.prune_epochs } else { 0 };
                let bar = indicatif::ProgressBar::new(epochs as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix}: [{bar:30}] {pos}/{len} epochs, {msg} ({elapsed})",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_prefix(job.clone());
                bar.set_message("starting");
                bar
            });
            let progress = |p: &maas_train::trainer::Progress| match &bar {
                Some(bar) => {
                    bar.inc(1);
                    let phase = if p.phase == "train" { "" } else { "fine-tune: " };
                    bar.set_message(format!("{phase}loss {:.4}, held-out accuracy {:.2}%", p.loss, 100.0 * p.accuracy));
                }
                None => eprintln!("{job}: {p}"),
            };
            let report = if j.is_placed() {
                // Workers or servers on nodes: over this process's cluster endpoint.
                let cluster = engine_options().cluster;
                runtime()?.block_on(async {
                    let placement = maas_engine::cluster::ClusterPlacement::new(&checked.graph, cluster)
                        .await
                        .map_err(maas_train::trainer::TrainError::Other)?;
                    maas_train::trainer::run_placed(
                        std::sync::Arc::new(checked.graph.clone()),
                        j.clone(),
                        registry.clone(),
                        out.clone(),
                        std::sync::Arc::default(),
                        &progress,
                        Some(placement),
                    )
                    .await
                })
            } else {
                maas_train::trainer::train(&checked.graph, &j, &registry, &out, &progress)
            };
            if let Some(bar) = &bar {
                bar.finish();
            }
            let report = report?;
            let mut json = serde_json::to_value(&report)?;
            if let (Some(url), Some(token)) = (swap_into, token) {
                match j.min_accuracy {
                    Some(min) if report.accuracy < min => {
                        let why = format!(
                            "held-out accuracy {:.4} is below min_accuracy {min}: nothing swapped",
                            report.accuracy
                        );
                        eprintln!("{job}: {why}");
                        json["swap_refused"] = serde_json::Value::String(why);
                    }
                    _ => {
                        let mut weights = std::collections::BTreeMap::new();
                        for (name, path) in &report.weights {
                            let path = path.canonicalize().with_context(|| format!("{}", path.display()))?;
                            weights.insert(name.clone(), path);
                        }
                        let swapped = runtime()?.block_on(swap_over_http(&url, &token, &weights, &report.version))?;
                        for (name, s) in swapped.as_object().into_iter().flatten() {
                            eprintln!("{job}: swapped into {url}: {name} {} -> {}", s["previous"], s["version"]);
                        }
                        json["swapped"] = swapped;
                    }
                }
            }
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { files, pipeline } => {
            let checked = load(&files, &registry)?;
            let p = find_pipeline(&checked.graph, &pipeline, &files)?;
            print!("{}", maas_graphs::to_dot(&checked.graph, p));
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { name, listen, model_roots, max_frame } => node(name, listen, model_roots, max_frame),
        Command::Run { files, pipeline, inputs } => {
            let checked = load(&files, &registry)?;
            let p = find_pipeline(&checked.graph, &pipeline, &files)?;
            let values = parse_inputs(p, &inputs)?;
            let rt = runtime()?;
            rt.block_on(async {
                let engine = Engine::builder().options(engine_options()).from_graph(checked.graph.clone()).await?;
                let response = engine.infer(&pipeline, values).await;
                engine.shutdown().await;
                let response = response?;
                let mut out = serde_json::Map::new();
                for (name, v) in &response.outputs {
                    out.insert(name.clone(), json::value_to_json(v)?);
                }
                println!("{}", serde_json::json!({ "outputs": out, "model_versions": response.versions }));
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Serve {
            files,
            addr,
            max_body,
            max_rows,
            state_dir,
            model_roots,
            watch,
            training_dir,
            max_load_memory,
            limits,
        } => serve(ServeArgs {
            files,
            addr,
            max_body,
            max_rows,
            state_dir,
            model_roots,
            watch,
            training_dir,
            max_load_memory,
            limits,
        }),
        Command::Bench {
            url: Some(url),
            protocol,
            files,
            pipeline,
            concurrency,
            duration,
            rate,
            inputs,
            baseline,
            swap,
            swap_params,
            swap_every,
        } => {
            let mut body = serde_json::Map::new();
            for arg in &inputs {
                let (name, raw) = arg.split_once('=').with_context(|| format!("--input `{arg}` is not NAME=VALUE"))?;
                let text = match raw.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                    None => raw.to_string(),
                };
                let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
                body.insert(name.to_string(), value);
            }
            let cfg = BenchConfig {
                pipeline: pipeline.clone(),
                concurrency,
                duration: Duration::from_secs_f64(duration),
                rate,
            };
            // With graph files, --baseline also runs the bare kernels here, in the same run.
            let base = if baseline && !files.is_empty() {
                let checked = load(&files, &registry)?;
                let p = find_pipeline(&checked.graph, &pipeline, &files)?;
                let values = parse_inputs(p, &inputs)?;
                Some(measure_baseline(&checked.graph, &registry, &values, &cfg)?)
            } else {
                None
            };
            let changes = match parse_swap(swap.as_deref(), swap_params.as_deref(), swap_every)? {
                Some(swap) => {
                    let token =
                        std::env::var("MAAS_ADMIN_TOKEN").context("--swap with --url needs MAAS_ADMIN_TOKEN")?;
                    let changer = bench::http_changer(&url, token, swap);
                    Some(bench::Changes { every: Duration::from_secs_f64(swap_every), changer })
                }
                None => None,
            };
            let report = runtime()?.block_on(bench::run_http(&url, protocol, body, &cfg, changes))?;
            println!("{}", with_baseline(report, base));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            files,
            url: None,
            protocol: _, // only with --url: clap refuses it without
            pipeline,
            concurrency,
            duration,
            rate,
            inputs,
            baseline,
            swap,
            swap_params,
            swap_every,
        } => {
            let swap = parse_swap(swap.as_deref(), swap_params.as_deref(), swap_every)?;
            let checked = load(&files, &registry)?;
            let p = find_pipeline(&checked.graph, &pipeline, &files)?;
            let values = parse_inputs(p, &inputs)?;
            let cfg = BenchConfig {
                pipeline: pipeline.clone(),
                concurrency,
                duration: Duration::from_secs_f64(duration),
                rate,
            };
            let base = if baseline { Some(measure_baseline(&checked.graph, &registry, &values, &cfg)?) } else { None };
            let rt = runtime()?;
            rt.block_on(async {
                let engine = Engine::builder()
                    .register(maas_kernels::FixedCost)
                    .options(engine_options())
                    .from_graph(checked.graph.clone())
                    .await?;
                // Warm up every submodel once before measuring.
                let _ = engine.infer(&pipeline, values.clone()).await;
                let changes = swap.map(|swap| bench::Changes {
                    every: Duration::from_secs_f64(swap_every),
                    changer: bench::engine_changer(engine.clone(), swap),
                });
                let report = bench::run(&engine, values, &cfg, changes).await;
                engine.shutdown().await;
                let report = with_baseline(report, base);
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}
