//! The HTTP server under `maas serve`: accepts connections for an axum [`Router`] with the
//! limits a public-facing server needs.
//!
//! - **A cap on open connections** ([`ServerConfig::max_connections`]; by default a little
//!   under the process's file-descriptor limit). A connection over the cap is answered at once
//!   with `503 {"error": {"kind": "overloaded", ...}}` and `Retry-After`, then closed, so the
//!   connections in progress keep their descriptors and the server never stops accepting.
//! - **Header timeout**: a new connection must deliver its first request's header within
//!   [`ServerConfig::header_timeout`] of opening, and a later request's header must arrive
//!   within it from its first byte, or the connection is closed (a slow-header or silent client
//!   holds a connection for that long at most).
//! - **Idle timeout**: a keep-alive connection with no request in progress and no byte of a
//!   new one is closed after [`ServerConfig::idle_timeout`]; so is one whose client takes no
//!   byte of its answer for that long (a client reading a long answer slowly is not idle).
//! - The body timeout (a request's whole body within a time) is the router's, in
//!   [`crate::http::HttpConfig::body_timeout`], so an embedding application gets it too.
//! - **Bounded graceful shutdown**: when `shutdown` resolves the listener closes; idle
//!   connections close at once; requests in flight get [`ServerConfig::shutdown_grace`] to
//!   finish (their connections close after their response); then every connection still open
//!   (a partial header, a slow body, a request still computing) is closed and [`serve`] returns.
//!
//! Each connection is one task; a watchdog inside it sees what the connection is doing (bytes
//! read through a wrapper around the socket, requests in progress through a wrapper around the
//! service) and closes it when a limit passes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::http::HttpMetrics;

/// Default time for a request's header to arrive, from its first byte.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may stay open with nothing in progress.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time requests in flight get to finish after shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Descriptors kept free for everything but connections and refusals (model files, state, logs).
const RESERVED_FDS: usize = 64;
/// Most connections refused at once (each holds its descriptor for a short write).
const MAX_REFUSING: usize = 32;
/// hyper's read buffer per connection: bounds what a connection holds before a handler runs.
const MAX_READ_BUFFER: usize = 64 << 10;
/// Requests in progress at once on one HTTP/2 connection.
const MAX_STREAMS: u32 = 32;

/// Limits of the server loop.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// From a request's first byte, the most time its header may take to arrive.
    pub header_timeout: Duration,
    /// The most time a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// The most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// After shutdown begins, how long requests in flight get before their connections close.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: default_max_connections(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// The default connection cap: the process's soft file-descriptor limit less a reserve for
/// everything else (64) and for connections being refused (32), between 16 and 65,536 (1,024
/// where the limit cannot be read).
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<usize>().ok()
    });
    match soft {
        Some(n) => n.saturating_sub(RESERVED_FDS + MAX_REFUSING).clamp(16, 65_536),
        None => 1024,
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then shuts down within the grace
/// period (see the module docs). Connection counts and closures are recorded in `metrics`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServerConfig,
    metrics: Arc<HttpMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or another transient error): back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let (router, config, metrics, stop) =
                    (router.clone(), config.clone(), metrics.clone(), stop_rx.clone());
                connections.spawn(async move {
                    let _open = OpenConnection::new(&metrics);
                    connection(stream, router, &config, &metrics, stop).await;
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.connection_refused();
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                } // else: too many refusals in progress; dropping the stream closes it
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(config.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            () = &mut grace => {
                let left = connections.len();
                if left > 0 {
                    tracing::warn!(connections = left, "shutdown grace period over: closing the connections still open");
                }
                connections.shutdown().await;
                break;
            }
            next = connections.join_next() => if next.is_none() { break },
        }
    }
    Ok(())
}

/// Counts a connection as open for as long as it lives (also when its task is aborted).
struct OpenConnection<'a>(&'a HttpMetrics);

impl<'a> OpenConnection<'a> {
    fn new(metrics: &'a HttpMetrics) -> Self {
        metrics.connection_opened();
        Self(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// Answers a connection over the cap with a 503 and closes it, without parsing the request.
/// Whatever the client sent is read and dropped (up to 64 KiB, within a second) after the
/// answer: closing a socket with unread input resets it, and the client might never see the 503.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":{"kind":"overloaded","message":"too many open connections; retry later"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut left = response.as_bytes();
        while !left.is_empty() {
            stream.writable().await?;
            match stream.try_write(left) {
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        // Half-close, then drain what the client sends until it closes too.
        std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 << 10 {
            stream.readable().await?;
            match stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What a connection is doing, as its watchdog sees it.
#[derive(Default)]
struct Activity {
    /// Milliseconds since the connection opened, +1, of the first byte read since it was last
    /// idle (0: none).
    first_byte_ms: AtomicU64,
    /// Milliseconds since the connection opened at which it last became idle.
    idle_since_ms: AtomicU64,
    /// Requests dispatched and not yet answered.
    in_flight: AtomicUsize,
    /// Milliseconds since the connection opened of the last byte written.
    last_write_ms: AtomicU64,
    /// The socket refused the last write (the client is not taking bytes).
    write_blocked: AtomicBool,
    /// The connection speaks HTTP/2 (seen on its first request): frames between requests
    /// (pings, window updates, settings) are not the start of a header, so between requests it
    /// is bound by the idle timeout alone.
    http2: AtomicBool,
}

/// A request in progress on a connection; when it ends (answered, or its future dropped) the
/// connection is quiet from then unless bytes move (the answer being written, or a next request
/// arriving).
struct InFlight {
    activity: Arc<Activity>,
    opened: Instant,
}

impl InFlight {
    fn new(activity: Arc<Activity>, opened: Instant) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        Self { activity, opened }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.first_byte_ms.store(0, Relaxed);
        self.activity.idle_since_ms.store(self.opened.elapsed().as_millis() as u64, Relaxed);
        self.activity.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Which timeout a watchdog closed a connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// A request's header did not arrive in time.
    Header,
    /// Nothing happened on a connection between requests.
    Idle,
    /// The client took no byte of a response for the idle timeout.
    Write,
}

/// Serves one connection until it ends, a limit passes, or the shutdown grace is over.
async fn connection(
    stream: TcpStream,
    router: Router,
    config: &ServerConfig,
    metrics: &HttpMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let opened = Instant::now();
    let activity = Arc::new(Activity::default());
    // The first request's header is due `header_timeout` after the connection opens, whether
    // or not a byte of it came (a connection that says nothing is a slow header).
    activity.first_byte_ms.store(1, Relaxed);
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone(), opened });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut router = router.clone();
        if req.version() == hyper::Version::HTTP_2 {
            service_activity.http2.store(true, Relaxed);
        }
        // Counted in flight until answered or dropped (an HTTP/2 client may reset one stream
        // and keep the connection: a request whose future is dropped must not hold off the
        // watchdog forever).
        let in_flight = InFlight::new(service_activity.clone(), opened);
        async move {
            let response = tower_service::Service::call(&mut router, req).await;
            drop(in_flight);
            response
        }
    });
    // HTTP/1.1, or HTTP/2 with prior knowledge (cleartext: how gRPC clients connect), told apart
    // by the connection preface.
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().keep_alive(true).max_headers(crate::http::MAX_HEADERS * 2).max_buf_size(MAX_READ_BUFFER);
    builder
        .http2()
        .max_header_list_size((crate::http::MAX_HEADER_BYTES * 2) as u32)
        .max_concurrent_streams(MAX_STREAMS);
    let mut conn = std::pin::pin!(builder.serve_connection(io, service));
    let tick = (config.header_timeout.min(config.idle_timeout) / 8)
        .clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = tokio::time::sleep(tick) => {
                if let Some(reason) = overdue(&activity, opened.elapsed(), config) {
                    metrics.connection_timed_out(reason);
                    tracing::debug!(?reason, "closing a connection");
                    return; // dropping the connection closes the socket
                }
            }
        }
    }
}

/// Whether a connection passed a limit, `now` being the time since it opened.
fn overdue(activity: &Activity, now: Duration, config: &ServerConfig) -> Option<Closed> {
    if activity.in_flight.load(Relaxed) > 0 {
        return None; // the router's body timeout and the request's deadline bound this
    }
    let now_ms = now.as_millis() as u64;
    let http2 = activity.http2.load(Relaxed);
    let first_byte = if http2 { 0 } else { activity.first_byte_ms.load(Relaxed) };
    match first_byte {
        0 => {
            // Quiet since the answer, or since its last byte was written: a client reading a
            // long answer slowly is not idle; one that takes nothing is. On HTTP/2 the server
            // writes on its own (ping and settings acknowledgements), so only the last answer
            // counts: a client that pings and never asks is idle.
            let last_write = if http2 { 0 } else { activity.last_write_ms.load(Relaxed) };
            let since = activity.idle_since_ms.load(Relaxed).max(last_write);
            if now_ms.saturating_sub(since) <= config.idle_timeout.as_millis() as u64 {
                None
            } else if activity.write_blocked.load(Relaxed) {
                Some(Closed::Write)
            } else {
                Some(Closed::Idle)
            }
        }
        first => {
            let reading_for = now_ms.saturating_sub(first - 1);
            (reading_for > config.header_timeout.as_millis() as u64).then_some(Closed::Header)
        }
    }
}

/// A socket that tells its connection's [`Activity`] when bytes arrive and leave.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    opened: Instant,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && self.activity.first_byte_ms.load(Relaxed) == 0 {
            let ms = self.opened.elapsed().as_millis() as u64 + 1;
            let _ = self.activity.first_byte_ms.compare_exchange(0, ms, Relaxed, Relaxed);
        }
        r
    }
}

impl Watched {
    /// Records a write's outcome: bytes taken, or the client not taking any.
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.last_write_ms.store(self.opened.elapsed().as_millis() as u64, Relaxed);
                self.activity.write_blocked.store(false, Relaxed);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Relaxed),
            _ => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServerConfig {
        ServerConfig {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_connections: 4,
            shutdown_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_watchdog_tells_idle_from_a_slow_header_from_a_request_in_progress() {
        let a = Activity::default();
        let s = Duration::from_secs;
        assert_eq!(overdue(&a, s(4), &config()), None, "idle for 4 s of 5");
        assert_eq!(overdue(&a, s(6), &config()), Some(Closed::Idle));
        a.first_byte_ms.store(5_001, Relaxed); // first byte at 5 s
        assert_eq!(overdue(&a, s(6), &config()), None, "a header arriving for 1 s of 2");
        assert_eq!(overdue(&a, s(8), &config()), Some(Closed::Header));
        a.in_flight.store(1, Relaxed);
        assert_eq!(overdue(&a, s(100), &config()), None, "a request in progress is not the watchdog's");
        // Answered at 100 s; the answer is being written.
        a.in_flight.store(0, Relaxed);
        a.first_byte_ms.store(0, Relaxed);
        a.idle_since_ms.store(100_000, Relaxed);
        a.last_write_ms.store(103_000, Relaxed);
        assert_eq!(overdue(&a, s(107), &config()), None, "the client took a byte 4 s ago, of 5");
        a.write_blocked.store(true, Relaxed);
        assert_eq!(overdue(&a, s(109), &config()), Some(Closed::Write), "a client taking nothing for 6 s");
        a.write_blocked.store(false, Relaxed);
        assert_eq!(overdue(&a, s(109), &config()), Some(Closed::Idle), "nothing to write, nothing read");
        // HTTP/2: a ping or window update after the answer is not a slow header.
        a.http2.store(true, Relaxed);
        a.idle_since_ms.store(103_000, Relaxed); // answered at 103 s
        a.first_byte_ms.store(104_001, Relaxed);
        assert_eq!(overdue(&a, s(107), &config()), None, "frames 3 s after the answer, idle for 4 s of 5");
        assert_eq!(overdue(&a, s(109), &config()), Some(Closed::Idle));
        a.last_write_ms.store(108_500, Relaxed);
        assert_eq!(overdue(&a, s(109), &config()), Some(Closed::Idle), "a ping acknowledged is not an answer");
        // A request whose future is dropped (a reset stream) ends its hold on the watchdog.
        let a = Arc::new(Activity::default());
        let start = Instant::now();
        let r = InFlight::new(a.clone(), start);
        assert_eq!(overdue(&a, s(100), &config()), None);
        drop(r);
        assert_eq!(a.in_flight.load(Relaxed), 0);
        assert_eq!(overdue(&a, s(100), &config()), Some(Closed::Idle));
    }

    #[test]
    fn the_default_cap_leaves_descriptors_for_everything_else() {
        let cap = default_max_connections();
        assert!((16..=65_536).contains(&cap), "{cap}");
    }
}
