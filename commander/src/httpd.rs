//! The HTTP servers' accept loop (the API and OTLP/HTTP): what `axum::serve` does, with
//! the two limits it leaves out. A client must send a request's headers within
//! [`Limits::header_read_timeout`], on a new connection and between requests on a kept-
//! alive one, and at most [`Limits::max_connections`] connections are open at once; past
//! that a new connection is closed as soon as it is accepted, and counted. Without them,
//! a client that opens sockets and sends nothing holds a file descriptor each for as long
//! as it likes, until the commander can open no more files: its store's included.
//! A response that streams (`/v1/stream`, the control socket) is not bounded by either:
//! its headers were read, and its connection counts among the open ones until it ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// How long a client may take to send a request's headers: hyper's own default, which it
/// applies only when given a timer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a response may wait to write because its client reads nothing: a client that
/// keeps its socket open with a full receive window (a stalled stream reader) would
/// otherwise hold its connection, and its place among `http.max_streams`, for good.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections open at once unless the config says otherwise (`http.max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// What one server allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long a server that was told to stop waits for its connections to finish.
    pub shutdown_grace: Duration,
}

/// The server's figures: connections open now, and those closed at once because
/// `max_connections` were open.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub open: Gauge,
    pub refused: Counter,
}

/// Serves `router` on `listener` until `shutdown`, then lets the open connections finish
/// what they are doing (as `axum::serve`'s graceful shutdown does). Every request carries
/// the peer's [`ConnectInfo`], as `into_make_service_with_connect_info` gives it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    counters: Counters,
    shutdown: impl Future<Output = ()> + Send,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // a moment's pause, so a full descriptor table is not spun on.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            counters.refused.inc();
            drop(stream);
            continue;
        };
        let service = router
            .clone()
            .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.map(axum::body::Body::new)
            })
            .map_err(|e: Infallible| match e {});
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let stream = WriteStall::new(stream, WRITE_STALL_TIMEOUT);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        let open = counters.open.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(peer = %peer, error = %e, "http connection ended");
            }
            open.dec();
            drop(place);
        });
    }
    // Requests in progress may finish; a connection that still has not after this (a
    // client reading a response it never ends) is left behind, not waited for.
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "http connections still open after the shutdown grace; not waiting for them"
        );
    }
}

/// [`Limits::shutdown_grace`] unless a test says otherwise.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A connection whose writes fail once one has waited [`WRITE_STALL_TIMEOUT`] for its
/// client to read: hyper then ends the connection.
#[derive(Debug)]
pub struct WriteStall<IO> {
    io: IO,
    limit: Duration,
    /// Set while a write waits.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> WriteStall<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        WriteStall {
            io,
            limit,
            waiting: None,
        }
    }

    /// What a write that returned `polled` means: while it waits, the timer runs (and
    /// ends it with `TimedOut`); once it gets through, the timer goes.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteStall<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteStall<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Bytes of the HTTP/2 connection preface every client sends first (RFC 9113 §3.4).
const HTTP2_PREFACE_LEN: usize = 24;

/// A connection holding one of a server's places: given back, and the gauge lowered, when
/// it is dropped.
#[derive(Debug)]
pub struct Held<IO> {
    io: IO,
    _place: OwnedSemaphorePermit,
    open: Gauge,
    /// Until the client's first bytes are in: reading fails once the time is up.
    preface: Option<Preface>,
}

/// What a new connection has still to send, and by when.
#[derive(Debug)]
struct Preface {
    left: usize,
    by: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> Drop for Held<IO> {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Held<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(preface) = &mut this.preface else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len().saturating_sub(before);
                preface.left = preface.left.saturating_sub(got);
                if preface.left == 0 || got == 0 {
                    this.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match preface.by.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface in time",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Held<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Held<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections `listener` accepts, at most `limits.max_connections` open at once:
/// past that one is closed as soon as it is accepted, and counted. For the OTLP/gRPC
/// server, which takes its connections as a stream: a client must send the HTTP/2
/// connection preface within `limits.header_read_timeout` (after it, tonic's HTTP/2
/// keep-alive pings find a peer that has gone). Accept errors (out of file descriptors)
/// are logged and waited out here: an error in the stream would end the server.
pub fn limited_incoming(
    listener: TcpListener,
    limits: Limits,
    counters: Counters,
) -> impl futures::Stream<Item = std::io::Result<Held<tokio::net::TcpStream>>> {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let preface_within = limits.header_read_timeout;
    futures::stream::unfold(
        (listener, places, counters),
        move |(listener, places, counters)| async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(place) = places.clone().try_acquire_owned() else {
                    counters.refused.inc();
                    continue;
                };
                // gRPC calls are small and many: as tonic's own listener does.
                let _ = stream.set_nodelay(true);
                counters.open.inc();
                let held = Held {
                    io: stream,
                    _place: place,
                    open: counters.open.clone(),
                    preface: Some(Preface {
                        left: HTTP2_PREFACE_LEN,
                        by: Box::pin(tokio::time::sleep(preface_within)),
                    }),
                };
                return Some((Ok(held), (listener, places, counters)));
            }
        },
    )
}

/// Raises this process's soft limit on open files to its hard limit, as Go programs and
/// nats-server do: the default soft limit (1,024 on most Linux systems) is below what
/// `http.max_connections` lets clients hold, beside the store's files and the NATS
/// connections. Returns the limit in force (`None`: unlimited or unknown).
pub fn raise_open_files() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::warn!(error = %e, "open-file limit not raised"),
        }
    }
    limit.current
}

/// The peer address type every request carries.
pub type Peer = ConnectInfo<SocketAddr>;

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn closed(s: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Told to stop, a server waits for its connections only for the grace: a response
    /// that never ends (a client still reading it) does not keep it from stopping.
    #[tokio::test]
    async fn a_server_told_to_stop_waits_for_its_connections_only_for_the_grace() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/endless",
            axum::routing::get(|| async {
                axum::body::Body::from_stream(futures::stream::pending::<
                    Result<bytes::Bytes, std::io::Error>,
                >())
            }),
        );
        let limits = Limits {
            max_connections: 8,
            header_read_timeout: HEADER_READ_TIMEOUT,
            shutdown_grace: Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            router,
            limits,
            Counters::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stopped after the grace")
            .unwrap();
    }

    /// A write that waits longer than the limit for its client to read fails; one whose
    /// client reads goes on however long the whole takes (32 MiB here, many times the
    /// socket buffers).
    #[tokio::test]
    async fn a_client_that_reads_nothing_fails_the_write_after_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chunk = vec![b'x'; 64 * 1024];

        let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = WriteStall::new(server, Duration::from_millis(300));
        let mut written = 0usize;
        let err = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match server.write(&chunk).await {
                    Ok(n) => written += n,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the write gave up");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(written > 0, "it wrote until the buffers were full");

        let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = WriteStall::new(server, Duration::from_millis(300));
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0usize;
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        let total = 32 * 1024 * 1024;
        let mut sent = 0;
        while sent < total {
            sent += server
                .write(&chunk)
                .await
                .expect("a reading client is written to");
        }
        drop(server);
        assert_eq!(drain.await.unwrap(), sent);
    }

    /// A gRPC client has the header timeout to send the HTTP/2 preface, in as many parts
    /// as it likes; after it the connection may idle (keep-alive pings watch it then).
    #[tokio::test]
    async fn a_grpc_client_must_send_its_preface_in_time() {
        use futures::StreamExt;
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(300),
            shutdown_grace: SHUTDOWN_GRACE,
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, Counters::default()));
        let mut buf = [0u8; 64];
        async fn within<F: Future>(f: F) -> F::Output {
            tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .expect("an answer in time")
        }

        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut held = incoming.next().await.unwrap().unwrap();
        let err = within(held.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);

        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut held = incoming.next().await.unwrap().unwrap();
        partial.write_all(&PREFACE[..10]).await.unwrap();
        assert_eq!(within(held.read(&mut buf)).await.unwrap(), 10);
        let err = within(held.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "half a preface");

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut held = incoming.next().await.unwrap().unwrap();
        let mut got = 0;
        for part in [&PREFACE[..10], &PREFACE[10..]] {
            client.write_all(part).await.unwrap();
            got += within(held.read(&mut buf)).await.unwrap();
        }
        assert_eq!(got, PREFACE.len());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let idle = tokio::time::timeout(Duration::from_millis(300), held.read(&mut buf)).await;
        assert!(
            idle.is_err(),
            "past the preface, idling is not an error: {idle:?}"
        );
        client.write_all(b"x").await.unwrap();
        assert_eq!(within(held.read(&mut buf)).await.unwrap(), 1);
    }

    /// A client that sends no headers is let go of after the timeout; past the limit a
    /// connection is closed at once and counted; a request is answered with its peer.
    #[tokio::test]
    async fn silent_clients_are_let_go_and_connections_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(p): Peer| async move { p.ip().to_string() }),
        );
        let counters = Counters::default();
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            shutdown_grace: SHUTDOWN_GRACE,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, limits, counters.clone(), async {
            let _ = stop_rx.await;
        }));

        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET /peer HTTP/1.1\r\n").await.unwrap();
        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut third).await, "past the limit: closed at once");
        assert_eq!(counters.refused.get(), 1);

        talker
            .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 512];
        let n = talker.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1"), "{answer}");

        assert!(closed(&mut silent).await, "headers never finished");
        assert!(
            closed(&mut talker).await,
            "idle after its request, it is let go too"
        );
        // Both places are free again.
        let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        again.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop_tx.send(());
        server.await.unwrap();
        assert_eq!(counters.open.get(), 0);
    }

    /// The gRPC server's connections are bounded the same way: past the limit one is
    /// closed at once, and a place comes back when a held connection is dropped.
    #[tokio::test]
    async fn incoming_connections_past_the_limit_are_closed_and_counted() {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Counters::default();
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: HEADER_READ_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, counters.clone()));
        let _first_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        assert_eq!(counters.open.get(), 1);
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The second is refused while the stream waits for one it may hand out.
        let next = tokio::spawn(async move { incoming.next().await.map(|r| r.unwrap()) });
        assert!(closed(&mut second).await, "past the limit: closed at once");
        assert_eq!(counters.refused.get(), 1);
        drop(first);
        assert_eq!(counters.open.get(), 0);
        let fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let held = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("a connection once a place is back")
            .unwrap();
        assert!(held.is_some());
        assert_eq!(counters.open.get(), 1);
        drop(fourth);
    }
}
