//! A small HTTP/1.1 keep-alive service to switch between in tests and benchmarks.
//!
//! It answers `GET /version` with its identity, `GET /health` with `ok`, anything else with
//! `hello`, and it can *drain*: answer in-flight requests with `Connection: close`, close idle
//! keep-alive connections, and keep listening — what the switcher asks of a service before it
//! moves the path. It runs on its own thread in any network namespace, so a test can put one in
//! each LC namespace it created.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reference server: cannot join network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reference server: cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running reference server. Dropping it stops it.
pub struct RefServer {
    drain: watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    served: Arc<AtomicU64>,
    /// The address it listens on (the real port when asked for port 0).
    pub addr: SocketAddr,
}

impl RefServer {
    /// Starts serving on `addr` inside `netns`.
    pub fn start(
        netns: Option<&Path>,
        addr: SocketAddr,
        identity: &str,
    ) -> Result<RefServer, ServerError> {
        let (drain_tx, drain_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let served = Arc::new(AtomicU64::new(0));
        let identity: Arc<str> = identity.into();
        let netns = netns.map(Path::to_path_buf);
        let served2 = served.clone();
        let thread = std::thread::Builder::new()
            .name(format!("po-refsrv-{addr}"))
            .spawn(move || {
                if let Some(ns) = &netns {
                    let r = std::fs::File::open(ns).and_then(|f| {
                        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                    });
                    if let Err(source) = r {
                        let _ = ready_tx.send(Err(ServerError::Netns {
                            path: ns.clone(),
                            source,
                        }));
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = ready_tx.send(Err(ServerError::Listen { addr, source }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = (|| {
                        let s = TcpSocket::new_v4()?;
                        s.set_reuseaddr(true)?;
                        s.bind(addr)?;
                        s.listen(4096)
                    })();
                    let listener = match listener {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(l.local_addr().unwrap_or(addr)));
                            l
                        }
                        Err(source) => {
                            let _ = ready_tx.send(Err(ServerError::Listen { addr, source }));
                            return;
                        }
                    };
                    let mut stop_rx = stop_rx;
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            acc = listener.accept() => {
                                if let Ok((s, _)) = acc {
                                    let _ = s.set_nodelay(true);
                                    tokio::spawn(conn(s, drain_rx.clone(), identity.clone(), served2.clone()));
                                }
                            }
                        }
                    }
                });
            })
            .map_err(|source| ServerError::Listen { addr, source })?;
        match ready_rx.recv() {
            Ok(Ok(bound)) => Ok(RefServer {
                drain: drain_tx,
                stop: Some(stop_tx),
                thread: Some(thread),
                served,
                addr: bound,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ServerError::Listen {
                    addr,
                    source: std::io::Error::other("server thread ended"),
                })
            }
        }
    }

    /// Stops keeping connections alive (see the module docs); keeps listening.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Keeps connections alive again.
    pub fn resume(&self) {
        self.drain.send_replace(false);
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops listening and ends the thread (open connections are dropped).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RefServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn conn(
    mut s: TcpStream,
    mut drain: watch::Receiver<bool>,
    identity: Arc<str>,
    served: Arc<AtomicU64>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    // A connection that has not sent its first request yet is not idle: its client is about to
    // send one (like Go's StateNew). Only connections between requests close on drain.
    let mut answered = 0u64;
    loop {
        // Wait for a whole request head; an idle connection closes when draining starts.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let idle = buf.is_empty() && answered > 0;
            if tokio::select! {
                r = s.read(&mut tmp) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.extend_from_slice(&tmp[..n]);
                        None
                    }
                },
                r = drain.wait_for(|d| *d), if idle => {
                    drop(r);
                    Some(())
                }
            }
            .is_some()
            {
                let _ = s.shutdown().await;
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or("");
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut client_close = first.ends_with("HTTP/1.0");
        let mut body_len = 0usize;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("connection") {
                    client_close = v.trim().eq_ignore_ascii_case("close");
                } else if k.eq_ignore_ascii_case("content-length") {
                    body_len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        while buf.len() < head_end + body_len {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let (status, body) = match (method.as_str(), path.as_str()) {
            ("GET", "/version") => ("200 OK", format!("{identity}\n")),
            ("GET", "/health") => ("200 OK", "ok\n".to_string()),
            ("GET", _) | ("PUT", _) => ("200 OK", "hello\n".to_string()),
            _ => ("405 Method Not Allowed", "use GET\n".to_string()),
        };
        let draining = *drain.borrow();
        let close = client_close || draining;
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        served.fetch_add(1, Ordering::Relaxed);
        answered += 1;
        if close {
            let _ = s.shutdown().await;
            // Read until the client closes so the last data is never answered with a reset.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                while let Ok(n) = s.read(&mut tmp).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            return;
        }
    }
}
