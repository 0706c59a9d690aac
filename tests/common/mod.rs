//! Helpers shared by the root package's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use maas::http::{HttpConfig, router_with};
use maas_engine::Engine;

/// A fresh directory (canonical path) under the system temp dir, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("maas-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir.canonicalize().expect("canonical temp dir"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An engine served over HTTP on a free loopback port.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) engine: Engine,
    pub(crate) stop: tokio::sync::oneshot::Sender<()>,
    pub(crate) done: tokio::task::JoinHandle<()>,
}

/// Serves `engine` on a free loopback port until `stop` is sent.
pub(crate) async fn serve(engine: Engine, config: HttpConfig) -> Server {
    serve_with(engine, config, maas::server::ServerConfig::default()).await
}

/// Serves `engine` through maas's own server loop with explicit limits.
pub(crate) async fn serve_with(engine: Engine, config: HttpConfig, server: maas::server::ServerConfig) -> Server {
    let metrics = config.metrics.clone();
    let app = router_with(engine.clone(), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let stopped = async move {
            let _ = rx.await;
        };
        maas::server::serve(listener, app, server, metrics, stopped).await.expect("serve");
    });
    Server { addr, engine, stop, done }
}

impl Server {
    /// Stops accepting and waits for the server task to end.
    pub(crate) async fn shut(self) {
        self.stop.send(()).unwrap();
        self.done.await.unwrap();
    }
}

/// Polls `cond` every millisecond until it holds or `limit` passes; whether it held.
pub(crate) async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cond()
}

/// A `maas serve` child process, started in `dir` with admin token `t` and `--addr
/// 127.0.0.1:0`, as a user starts it.
pub(crate) struct ServeProcess {
    pub(crate) child: std::process::Child,
    /// Where it serves (`127.0.0.1:PORT`).
    pub(crate) addr: String,
    /// Its stderr lines after the address line (drained on a thread, so it never blocks).
    pub(crate) lines: std::sync::mpsc::Receiver<String>,
    /// What it printed up to its address.
    pub(crate) early: Vec<String>,
}

impl ServeProcess {
    /// Starts `maas serve ARGS`, with the descriptor limit lowered to `fd_limit` first when
    /// given; `Err` with what it printed when it exits before serving.
    pub(crate) fn spawn(args: &[&str], dir: &std::path::Path, fd_limit: Option<u32>) -> Result<Self, String> {
        use std::io::BufRead;
        let ulimit = fd_limit.map(|n| format!("ulimit -n {n} && ")).unwrap_or_default();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(r#"{ulimit}exec "$0" serve "$@" --addr 127.0.0.1:0"#))
            .arg(env!("CARGO_BIN_EXE_maas"))
            .args(args)
            .current_dir(dir)
            .env("MAAS_ADMIN_TOKEN", "t")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start maas serve");
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr piped");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut early = Vec::new();
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(120)) {
            if let Some(rest) = line.split("on http://").nth(1) {
                let addr = rest.trim().to_string();
                return Ok(Self { child, addr, lines, early });
            }
            early.push(line);
        }
        let _ = child.kill();
        let status = child.wait().expect("wait for maas serve");
        Err(format!("serve exited with {status} before serving:\n{}", early.join("\n")))
    }

    /// Sends SIGTERM.
    pub(crate) fn sigterm(&self) {
        let killed = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(killed.expect("run kill").success());
    }

    /// Waits up to `limit` for the process to exit: its exit code (`None`: killed by a signal,
    /// or still running at the limit, when it is killed).
    pub(crate) fn wait(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `maas` binary from the repository root with `envs` set (RUST_LOG removed): the exit
/// code, stdout as one JSON object (checked: a command that succeeds prints exactly one; one
/// that fails prints nothing there) and stderr.
pub(crate) fn maas_json(args: &[&str], envs: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .output()
        .expect("run maas");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = if out.status.success() {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"))
    } else {
        assert!(stdout.is_empty(), "a failed command wrote to stdout: {stdout}");
        serde_json::Value::Null
    };
    (out.status.code().unwrap_or(-1), json, stderr)
}
