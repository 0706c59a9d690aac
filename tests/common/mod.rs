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
