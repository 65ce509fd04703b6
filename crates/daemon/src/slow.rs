//! Slow, idle and too many clients: what a connection may hold, and for how long.
//!
//! Hyper (as axum runs it) has no header-read or idle timeout and no connection limit, so
//! without this a client (a network peer of the TCP listener is untrusted) that opens
//! connections and sends a few bytes each, or nothing after its first request, would hold a
//! task and its buffers forever, as many times as it likes. Three rules, on every listener:
//!
//! - **cap**: [`Capped`] admits at most `max_connections` at once; past it a new connection is
//!   answered `503` and closed at once (on TLS it is closed before its handshake, which would
//!   cost more than the answer is worth), and the refused one holds nothing;
//! - **head**: a request head must arrive within `head_timeout` from its first byte (the first
//!   request's from the connection's start), so a head trickled byte by byte (slow loris) is
//!   cut;
//! - **idle**: after an answer, the next request must start within `idle_timeout`.
//!
//! The deadlines run only while the connection is not answering: from the moment the HTTP
//! layer takes a request until its response body is done ([`Track::begin`], held by the
//! router's outermost layer) no deadline runs, so an event stream whose client sends nothing
//! for hours is never cut, and a long command is bounded by `request_timeout` instead.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Bytes, HttpBody};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::server::Hub;

/// A listener that admits at most `max` connections at once; see the module docs.
pub struct Capped<L> {
    inner: L,
    permits: Arc<Semaphore>,
    max: usize,
    /// Answer a refused connection with a plain-HTTP 503 (not on a TLS port).
    answer: bool,
    hub: Arc<Hub>,
}

impl<L> Capped<L> {
    pub fn new(inner: L, max: usize, answer: bool, hub: Arc<Hub>) -> Capped<L> {
        Capped {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            max,
            answer,
            hub,
        }
    }

    fn refusal(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "code": "unavailable",
            "message": format!(
                "the daemon holds its [daemon] max_connections ({}) connections on this listener; retry in a moment, and close connections you do not use",
                self.max
            ),
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// A stream a refusal can be written to without waiting (a fresh socket's send buffer is
/// empty) and drained without waiting (so the close is a FIN, not a reset that could
/// discard the answer at the client).
pub trait Refuse {
    fn refuse(&self, answer: Option<&[u8]>);
}

fn refuse_with(
    write: impl Fn(&[u8]) -> io::Result<usize>,
    read: impl Fn(&mut [u8]) -> io::Result<usize>,
    answer: Option<&[u8]>,
) {
    if let Some(a) = answer {
        let _ = write(a);
    }
    let mut scratch = [0u8; 1024];
    for _ in 0..16 {
        if !matches!(read(&mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
}

impl Refuse for tokio::net::TcpStream {
    fn refuse(&self, answer: Option<&[u8]>) {
        refuse_with(|b| self.try_write(b), |b| self.try_read(b), answer);
    }
}

impl Refuse for tokio::net::UnixStream {
    fn refuse(&self, answer: Option<&[u8]>) {
        refuse_with(|b| self.try_write(b), |b| self.try_read(b), answer);
    }
}

impl<L> Listener for Capped<L>
where
    L: Listener,
    L::Io: Refuse,
{
    type Io = Admitted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return (
                    Admitted {
                        io,
                        _permit: permit,
                    },
                    addr,
                );
            }
            self.hub
                .metrics
                .inc("patchover_connections_refused_total", &[]);
            tracing::warn!(max = self.max, "connection refused: max_connections open");
            let answer = self.answer.then(|| self.refusal());
            io.refuse(answer.as_deref());
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An admitted connection: it holds its place under the cap until it is dropped.
pub struct Admitted<I> {
    io: I,
    _permit: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Admitted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// Writes go straight through; only reads are judged (by [`Conn`]).
macro_rules! write_through {
    ($t:ident) => {
        impl<I: AsyncWrite + Unpin> AsyncWrite for $t<I> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}

write_through!(Admitted);
write_through!(Conn);

/// What the HTTP layer tells a connection: how many requests it took, how many it is
/// answering now. The axum connect info of a [`Guarded`] listener's connections.
#[derive(Clone, Default)]
pub struct Track(Arc<TrackState>);

#[derive(Default)]
struct TrackState {
    started: AtomicUsize,
    answering: AtomicUsize,
    /// The connection's reader, woken when an answer ends so the idle deadline starts.
    reader: AtomicWaker,
}

impl Track {
    /// The connection is answering a request until the returned guard drops.
    pub fn begin(&self) -> Answering {
        self.0.started.fetch_add(1, Ordering::SeqCst);
        self.0.answering.fetch_add(1, Ordering::SeqCst);
        Answering(self.clone())
    }
}

/// See [`Track::begin`].
pub struct Answering(Track);

impl Drop for Answering {
    fn drop(&mut self) {
        (self.0).0.answering.fetch_sub(1, Ordering::SeqCst);
        (self.0).0.reader.wake();
    }
}

impl<L: Listener> Connected<IncomingStream<'_, Guarded<L>>> for Track {
    fn connect_info(stream: IncomingStream<'_, Guarded<L>>) -> Track {
        stream.io().track.clone()
    }
}

/// A response body that keeps its connection [`Answering`] until it is done or dropped.
pub struct Tracked<B> {
    pub inner: B,
    pub answering: Answering,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A listener whose connections get the head and idle deadlines ([`Conn`]).
pub struct Guarded<L> {
    pub inner: L,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub hub: Arc<Hub>,
}

impl<L: Listener> Listener for Guarded<L> {
    type Io = Conn<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let mut conn = Conn {
            io,
            track: Track::default(),
            head_timeout: self.head_timeout,
            idle_timeout: self.idle_timeout,
            phase: Phase::Answering,
            deadline: None,
            seen: 0,
            hub: self.hub.clone(),
        };
        conn.enter(Phase::Head);
        (conn, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is coming (its first byte came, or the connection is new).
    Head,
    /// An answer ended; no byte of the next request yet.
    Idle,
    /// The HTTP layer is answering (reading the body, running, streaming): no deadline.
    Answering,
}

/// A connection whose reads fail once the deadline of its phase passes.
pub struct Conn<I> {
    io: I,
    track: Track,
    head_timeout: Duration,
    idle_timeout: Duration,
    phase: Phase,
    deadline: Option<Pin<Box<Sleep>>>,
    /// `track.started` when last looked at.
    seen: usize,
    hub: Arc<Hub>,
}

impl<I> Conn<I> {
    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.deadline = match phase {
            Phase::Head => Some(Box::pin(tokio::time::sleep(self.head_timeout))),
            Phase::Idle => Some(Box::pin(tokio::time::sleep(self.idle_timeout))),
            Phase::Answering => None,
        };
    }

    /// Follows what the HTTP layer did since the last look: answering now, or an answer
    /// ended (possibly a whole request came and went in between).
    fn observe(&mut self) {
        let s = &self.track.0;
        let started = s.started.load(Ordering::SeqCst);
        if s.answering.load(Ordering::SeqCst) > 0 {
            if self.phase != Phase::Answering {
                self.enter(Phase::Answering);
            }
        } else if started != self.seen || self.phase == Phase::Answering {
            self.enter(Phase::Idle);
        }
        self.seen = started;
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Conn<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.observe();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    // The next request's first bytes: its head has head_timeout from here.
                    this.enter(Phase::Head);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.track.0.reader.register(cx.waker());
                // An answer may have ended between the first look and the registration.
                this.observe();
                if !this.expired(cx) {
                    return Poll::Pending;
                }
                let (phase, what) = match this.phase {
                    Phase::Idle => ("idle", "no request within the idle timeout"),
                    _ => ("head", "no whole request head within the head timeout"),
                };
                tracing::debug!(phase, "closing a connection: {what}");
                this.hub
                    .metrics
                    .inc("patchover_connections_timed_out_total", &[phase]);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn conn<I>(io: I, hub: &Arc<Hub>) -> Conn<I> {
        let mut c = Conn {
            io,
            track: Track::default(),
            head_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            phase: Phase::Answering,
            deadline: None,
            seen: 0,
            hub: hub.clone(),
        };
        c.enter(Phase::Head);
        c
    }

    /// The phases on a paused clock: head (from the start), answering (no deadline however
    /// long), idle after the answer, head again from the next request's first byte.
    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_phases() {
        let hub = Hub::new();
        let mut buf = [0u8; 64];
        // A connection that sends nothing: cut at the head timeout.
        let (_silent, server) = tokio::io::duplex(1024);
        let mut server = conn(server, &hub);
        let t0 = tokio::time::Instant::now();
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(2));

        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = conn(server, &hub);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(server.read(&mut buf).await.unwrap() > 0);
        let answering = server.track.begin();
        // Answering: an hour of silence is not cut.
        let quiet = tokio::time::timeout(Duration::from_secs(3600), server.read(&mut buf)).await;
        assert!(quiet.is_err(), "cut while answering: {quiet:?}");
        drop(answering);
        let t0 = tokio::time::Instant::now();
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(5), "the idle timeout");
        assert_eq!(
            hub.metrics
                .get("patchover_connections_timed_out_total", &["idle"]),
            1.0
        );
        assert_eq!(
            hub.metrics
                .get("patchover_connections_timed_out_total", &["head"]),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_after_an_answer_is_cut_at_the_head_timeout() {
        let hub = Hub::new();
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = conn(server, &hub);
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(server.read(&mut buf).await.unwrap() > 0);
        drop(server.track.begin());
        // Idle for 4 s (under the idle timeout), then a byte every 500 ms.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let t0 = tokio::time::Instant::now();
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaa" {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let e = loop {
            match server.read(&mut buf).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(2),
            "head timeout from the first byte"
        );
        trickle.abort();
    }

    /// The cap on real loopback sockets: past it a plain listener answers 503 and closes, a
    /// TLS one (no answer) closes before any byte; a place comes back when a holder closes.
    #[tokio::test]
    async fn past_the_cap_a_connection_is_answered_or_closed_and_places_come_back() {
        for answer in [true, false] {
            let hub = Hub::new();
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = tcp.local_addr().unwrap();
            let mut l = Capped::new(tcp, 1, answer, hub.clone());
            let holder = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (admitted, _) = l.accept().await;
            let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The next accept refuses `over` and waits for a connection it can admit.
            let next = tokio::spawn(async move {
                let (io, _) = l.accept().await;
                (io, l)
            });
            let mut got = Vec::new();
            over.read_to_end(&mut got).await.unwrap();
            let got = String::from_utf8_lossy(&got);
            if answer {
                assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
                assert!(got.contains("max_connections (1)"), "{got}");
            } else {
                assert_eq!(got, "", "a TLS port answers nothing in clear");
            }
            assert_eq!(
                hub.metrics.get("patchover_connections_refused_total", &[]),
                1.0
            );
            drop((admitted, holder));
            let _again = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (io, _l) = tokio::time::timeout(Duration::from_secs(5), next)
                .await
                .expect("a place after the holder closed")
                .unwrap();
            drop(io);
        }
    }
}
