//! Running code inside a network namespace.
//!
//! Every LC has its own network namespace, and the bridge may itself live in one (tests put the
//! whole topology into namespaces they own). A socket belongs to the namespace of the thread that
//! created it, so the switcher runs namespace-bound work on a short-lived thread that has joined
//! the namespace with `setns(2)`; the calling thread never changes namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Joining a network namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: cannot open it; is the LC running?")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path}: cannot join it (needs root)")]
    Join {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("network namespace {path}: the worker thread panicked")]
    Panicked { path: PathBuf },
}

/// Runs `f` with the calling context's namespace if `netns` is `None`, else on a thread that
/// joined `netns` first. Sockets `f` creates stay in that namespace after it returns.
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(f())
        });
        h.join().map_err(|_| NetnsError::Panicked {
            path: path.to_path_buf(),
        })?
    })
}

/// Joins `netns` in the current thread. For threads that live in one namespace for good (the
/// load generator's runtime thread, a test server).
pub fn enter_netns(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
        path: path.to_path_buf(),
        source,
    })
}

/// A command that runs in `netns` (joined in the child between fork and exec).
pub fn command_in(
    netns: Option<&Path>,
    program: &str,
) -> Result<std::process::Command, NetnsError> {
    let mut cmd = std::process::Command::new(program);
    if let Some(path) = netns {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = file.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only calls setns(2),
        // which is async-signal-safe; `file` is kept alive by the closure so `fd` stays open.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &file;
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(cmd)
}

/// TCP connection states that still carry or may still carry a request (see `tcp_states.h`).
const BUSY_STATES: [u8; 6] = [0x01, 0x03, 0x04, 0x08, 0x09, 0x0B];

/// Counts TCP sockets on local `port` in `netns` that still carry traffic: established,
/// half-open, or closing with data possibly in flight. `TIME_WAIT` and `FIN_WAIT2` do not count:
/// the server has sent everything by then.
///
/// Reads the kernel's socket table (`/proc/thread-self/net/tcp`), a fixed-format table meant to be
/// read by programs.
pub fn busy_tcp_connections(netns: Option<&Path>, port: u16) -> Result<usize, NetnsError> {
    in_netns(netns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
        count_busy(&text, port)
    })
}

fn count_busy(table: &str, port: u16) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let (Some(_sl), Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            let Some((_, p)) = local.split_once(':') else {
                return false;
            };
            let local_port = u16::from_str_radix(p, 16).ok();
            let st = u8::from_str_radix(state, 16).ok();
            local_port == Some(port) && st.is_some_and(|s| BUSY_STATES.contains(&s))
        })
        .count()
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that joined a namespace once and runs closures there.
///
/// Joining a namespace costs milliseconds on a busy host (a new thread and `setns(2)`); inside a
/// switch pause every millisecond counts, so the switcher starts one worker per namespace before
/// the pause and sends it the work.
pub struct NsWorker {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsWorker {
    /// Starts a worker in `netns` (`None`: the caller's namespace).
    pub fn start(netns: Option<&Path>) -> Result<NsWorker, NetnsError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = netns.map(Path::to_path_buf);
        let thread = std::thread::Builder::new()
            .name("po-netns".into())
            .spawn(move || {
                if let Some(p) = &ns
                    && let Err(e) = enter_netns(p)
                {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|_| NetnsError::Panicked {
                path: netns.map(Path::to_path_buf).unwrap_or_default(),
            })?;
        let path = netns.map(Path::to_path_buf).unwrap_or_default();
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(NsWorker {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(NetnsError::Panicked { path }),
        }
    }

    /// Runs `f` in the worker's namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let dead = || NetnsError::Panicked {
            path: PathBuf::from("<worker>"),
        };
        self.tx
            .as_ref()
            .ok_or_else(dead)?
            .send(job)
            .map_err(|_| dead())?;
        rx.recv().map_err(|_| dead())
    }

    /// Counts busy TCP connections on `port` (see [`busy_tcp_connections`]).
    pub fn busy_tcp_connections(&self, port: u16) -> Result<usize, NetnsError> {
        self.run(move || {
            let text = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
            count_busy(&text, port)
        })
    }
}

impl Drop for NsWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_busy_sockets_on_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0A00000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0A00000A:1F90 C800000A:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0A00000A:1F90 C800000A:A1B3 06 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   3: 0A00000A:1F90 C800000A:A1B4 08 00000000:00000000 00:00000000 00000000     0        0 4 1\n\
   4: 0A00000A:0016 C800000A:A1B5 01 00000000:00000000 00:00000000 00000000     0        0 5 1\n";
        assert_eq!(count_busy(table, 8080), 2);
        assert_eq!(count_busy(table, 22), 1);
        assert_eq!(count_busy(table, 9), 0);
    }
}
