//! The guarded HTTP server every API of hasp runs on.
//!
//! `axum::serve` accepts whatever comes: one source may open every connection the
//! process can hold, a client that sends half a header keeps its connection (and its
//! task) forever, and when the process runs out of descriptors `accept` fails at once,
//! again and again, each failure logged. [`serve`] is the same service behind:
//!
//! - **connection caps**: at most `max_connections` at once, and at most
//!   `max_connections_per_ip` from one source address, so one source at its cap leaves
//!   room for everyone else. A connection over a cap is accepted and closed at once
//!   (counted), which costs the process nothing beyond the accept;
//! - **a header read timeout** (hyper's own `header_read_timeout`): a request head not
//!   complete within it closes the connection. Hyper starts that timer whenever it waits
//!   for a request, so a keep-alive connection idle between requests is closed after it
//!   too;
//! - **an idle timeout**: a connection on which no byte moved either way for that long
//!   (a body sent a byte a minute, a response the client does not read) is closed;
//! - **back-off on EMFILE/ENFILE** (and ENOBUFS/ENOMEM): accept pauses 100 ms and counts
//!   it, rather than spinning on a listener the kernel keeps reporting readable;
//! - **graceful shutdown**: when `shutdown` resolves, accepting stops, requests in
//!   progress finish (for up to [`SHUTDOWN_GRACE`]) and idle connections close.
//!
//! Each request carries the peer address as axum's `ConnectInfo<SocketAddr>`, as
//! `into_make_service_with_connect_info` would give it (the LI API audits it).
//!
//! Each listener counts into its [`ListenerStats`]; those made by [`exported`] are listed
//! by [`listeners`] and exposed on `/metrics` as `hasp_http_*{listener="…"}` (see
//! `obs::http`). The LI API's are not: interception stays invisible there.

use super::admission::{out_of_resources, Admission};
use crate::error::Error;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// How long requests in progress may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long accepting pauses when the process (or the system) is out of descriptors.
const BACKOFF: Duration = Duration::from_millis(100);

/// Largest request head (request line and headers) accepted; a larger one is answered
/// 431 by hyper. The APIs' heads are a few hundred bytes.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The limits of one HTTP listener (config `[relay.http]`, `[proxy.http]`; flags
/// `--http-…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections open at once from one source IP; more from it are closed as soon as
    /// accepted, while other sources are still served.
    pub max_connections_per_ip: usize,
    /// Milliseconds a client has to send a whole request head, counted from when the
    /// server starts waiting for it (also the longest a keep-alive connection may sit
    /// idle between requests).
    pub header_timeout_ms: u64,
    /// Milliseconds without a byte received or sent after which a connection is closed.
    pub idle_timeout_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        // A header timeout longer than the 30 s our own HTTP clients keep idle
        // connections pooled (`proxy::anchor`), so the client, not the server, closes an
        // idle connection and a request never races the server's close.
        Self { max_connections: 1024, max_connections_per_ip: 256, header_timeout_ms: 60_000, idle_timeout_ms: 60_000 }
    }
}

impl HttpLimits {
    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return Err(Error::Config("http max_connections and max_connections_per_ip must be at least 1".into()));
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(Error::Config("http max_connections_per_ip must not exceed max_connections".into()));
        }
        if self.header_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return Err(Error::Config("http header_timeout_ms and idle_timeout_ms must be at least 1".into()));
        }
        Ok(())
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// Counters of one listener; read by the `/metrics` collector.
#[derive(Debug)]
pub struct ListenerStats {
    /// Which listener: `api`, `li_api`, …
    pub name: &'static str,
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections closed at once for being over a cap (total or per source IP).
    pub refused: AtomicU64,
    /// Times accepting paused for lack of descriptors (or kernel memory).
    pub accept_backoffs: AtomicU64,
    /// Connections closed by the header or the idle timeout.
    pub timeouts: AtomicU64,
}

impl ListenerStats {
    /// Zeroed counters of the listener `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            accept_backoffs: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<ListenerStats>>> {
    static LISTENERS: OnceLock<Mutex<Vec<Arc<ListenerStats>>>> = OnceLock::new();
    LISTENERS.get_or_init(Mutex::default)
}

/// New counters for the listener `name`, listed by [`listeners`] (so on `/metrics`).
pub fn exported(name: &'static str) -> Arc<ListenerStats> {
    let stats = Arc::new(ListenerStats::new(name));
    registry().lock().unwrap_or_else(|e| e.into_inner()).push(stats.clone());
    stats
}

/// The counters of every listener made by [`exported`] in this process, in start order.
///
/// Process-wide so that each `/metrics` (the relay's, `hasp proxy`'s) shows the HTTP
/// listeners of its process without each API's state carrying them.
pub fn listeners() -> Vec<Arc<ListenerStats>> {
    registry().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Serves `router` on `listener` under `limits`, counting into `stats`, until
/// `shutdown` resolves, then lets requests in progress finish for up to
/// [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    stats: Arc<ListenerStats>,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let name = stats.name;
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_ip);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout()).max_header_size(MAX_HEADER_BYTES);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) if out_of_resources(&e) => {
                stats.accept_backoffs.fetch_add(1, Relaxed);
                tracing::warn!(listener = name, error = %e, "HTTP accept failed; backing off");
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
            // The connection's own failure (reset before accept, …): the next is fine.
            Err(_) => continue,
        };
        let Some(ticket) = admission.admit(remote.ip()) else {
            stats.refused.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let io = Tracked::new(stream);
        let last = io.last.clone();
        let started = io.started;
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            router.clone().oneshot(req)
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        let (stats, idle) = (stats.clone(), limits.idle_timeout());
        tokio::spawn(async move {
            let _ticket = ticket;
            stats.open.fetch_add(1, Relaxed);
            tokio::select! {
                r = conn => {
                    if r.is_err_and(|e| e.is_timeout()) {
                        stats.timeouts.fetch_add(1, Relaxed);
                    }
                }
                () = idle_expiry(&last, started, idle) => {
                    // Dropping the connection closes the socket.
                    stats.timeouts.fetch_add(1, Relaxed);
                }
            }
            stats.open.fetch_sub(1, Relaxed);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = name, "HTTP connections still open after the shutdown grace period");
    }
    Ok(())
}

/// Resolves once nothing moved on the connection for `idle`.
async fn idle_expiry(last: &AtomicU64, started: Instant, idle: Duration) {
    loop {
        let deadline = started + Duration::from_millis(last.load(Relaxed)) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// A TCP stream that notes when a byte last moved (ms since `started`), for the idle
/// timeout: one relaxed store per read or write, no timer reset per byte.
struct Tracked {
    inner: TcpStream,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl Tracked {
    fn new(inner: TcpStream) -> Self {
        Self { inner, started: Instant::now(), last: Arc::default() }
    }

    fn touch(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> HttpLimits {
        HttpLimits { max_connections: total, max_connections_per_ip: per_ip, ..Default::default() }
    }

    #[test]
    fn limits_that_would_serve_nothing_are_refused() {
        assert!(HttpLimits::default().validate().is_ok());
        assert!(limits(0, 0).validate().is_err());
        assert!(limits(4, 8).validate().is_err(), "a per-IP cap above the total");
        assert!(HttpLimits { header_timeout_ms: 0, ..Default::default() }.validate().is_err());
        assert!(HttpLimits { idle_timeout_ms: 0, ..Default::default() }.validate().is_err());
    }
}
