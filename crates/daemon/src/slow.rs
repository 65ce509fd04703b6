//! Slow clients: a connection must send its first request head within a deadline, or it is
//! closed. Hyper (as axum runs it) has no header-read timeout, so without this a client that
//! opens connections and sends a few bytes each would hold them forever. After the first head
//! the deadline is off: an event stream's client legitimately sends nothing for hours.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A listener whose connections get [`HeadDeadline`].
pub struct Guarded<L> {
    pub inner: L,
    pub head_timeout: Duration,
}

impl<L: Listener> Listener for Guarded<L> {
    type Io = HeadDeadline<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (
            HeadDeadline {
                io,
                deadline: Some(Box::pin(tokio::time::sleep(self.head_timeout))),
                tail: 0,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails its reads once the deadline passes before a whole request head
/// (`\r\n\r\n`) arrived.
pub struct HeadDeadline<I> {
    io: I,
    deadline: Option<Pin<Box<Sleep>>>,
    /// How many bytes of `\r\n\r\n` the data so far ends with.
    tail: usize,
}

impl<I> HeadDeadline<I> {
    /// Feeds bytes to the end-of-head scanner; true once `\r\n\r\n` was seen.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        const END: &[u8] = b"\r\n\r\n";
        for &b in bytes {
            self.tail = if b == END[self.tail] {
                self.tail + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.tail == END.len() {
                return true;
            }
        }
        false
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    let new = buf.filled()[before..].to_vec();
                    if this.scan(&new) {
                        this.deadline = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    tracing::debug!("closing a connection that sent no whole request head in time");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request head before the deadline",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<I> {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_finds_the_end_of_a_head_split_anywhere() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..head.len() {
            let mut h = HeadDeadline {
                io: (),
                deadline: None,
                tail: 0,
            };
            let a = h.scan(&head[..split]);
            let b = h.scan(&head[split..]);
            assert!(!a && b, "split at {split}");
        }
        let mut h = HeadDeadline {
            io: (),
            deadline: None,
            tail: 0,
        };
        assert!(!h.scan(b"GET / HTTP/1.1\r\n\r\r\n"));
        assert!(h.scan(b"\r\n"));
    }
}
