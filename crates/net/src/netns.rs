//! Running code inside a network namespace.
//!
//! Every LC has its own network namespace, and the bridge may itself live in one (tests put the
//! whole topology into namespaces they own). A socket belongs to the namespace of the thread that
//! created it, so the switcher runs namespace-bound work on a short-lived thread that has joined
//! the namespace with `setns(2)`; the calling thread never changes namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

pub use patchover_netlink::netns::{NetnsError, enter_netns, in_netns};

/// A command that runs in `netns` (through `nsenter --net`, see below).
pub fn command_in(
    netns: Option<&Path>,
    program: &str,
) -> Result<std::process::Command, NetnsError> {
    let Some(path) = netns else {
        return Ok(std::process::Command::new(program));
    };
    // Checked here, so a missing namespace is told apart from a failing program.
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // `nsenter` joins the namespace in the child. Joining it in a `pre_exec` hook instead would
    // make std start the child with fork(2), which copies this process's page tables and
    // write-protects its memory: in a process that also serves (the daemon, the benchmark's
    // service and load) every thread then stalls on page faults for tens of milliseconds. A
    // command without a hook is started with posix_spawn (vfork), which copies nothing.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", path.display()))
        .arg("--")
        .arg(program);
    Ok(cmd)
}

/// Like [`command_in`], but `program` runs under the `SCHED_IDLE` policy (through `chrt --idle
/// 0`, from util-linux like `nsenter`): for heavy work no client waits for, which the scheduler
/// must preempt whenever a thread of the service wakes up (it does not always preempt a nice-19
/// task). Only `program` runs idle: `nsenter` and `chrt` start at the caller's priority, because
/// until its `exec` a child started with `posix_spawn` runs in the caller's memory, and a starved
/// child there could hold up the caller's other threads.
pub fn idle_command_in(
    netns: Option<&Path>,
    program: &str,
) -> Result<std::process::Command, NetnsError> {
    let mut cmd = command_in(netns, "chrt")?;
    cmd.args(["--idle", "0", program]);
    Ok(cmd)
}

/// TCP states that still carry or may still carry a request (`tcp_states.h`): established,
/// SYN_RECV, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING. `TIME_WAIT` and `FIN_WAIT2` do not
/// count: the server has sent everything by then.
pub(crate) const BUSY_MASK: u32 = (1 << 1) | (1 << 3) | (1 << 4) | (1 << 8) | (1 << 9) | (1 << 11);

/// Counts TCP sockets on local `port` in `netns` that still carry traffic (see [`BUSY_MASK`]).
///
/// Asks the kernel through `sock_diag` netlink with a state filter, so the tens of thousands of
/// `TIME_WAIT` sockets a busy server has are never even copied out (reading `/proc/net/tcp`
/// took tens of milliseconds per poll at 2,000 connections per second).
pub fn busy_tcp_connections(netns: Option<&Path>, port: u16) -> Result<usize, NetnsError> {
    in_netns(netns, || busy_here(port).unwrap_or(usize::MAX))
}

fn busy_here(port: u16) -> std::io::Result<usize> {
    Ok(busy_ids_here(port)?.len())
}

/// A `sock_diag` netlink socket in the calling thread's namespace.
fn diag_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the fd is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn diag_send(sock: &std::os::fd::OwnedFd, req: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `req` is valid for its length; the kernel is the implicit destination.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn diag_recv(sock: &std::os::fd::OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The busy TCP sockets on local `port` in the calling thread's namespace, by a dump of the
/// kernel's whole socket table (state-filtered, but walked whole: every `TIME_WAIT` socket of
/// every namespace is visited).
fn busy_ids_here(port: u16) -> std::io::Result<Vec<SockId>> {
    let sock = diag_socket()?;
    diag_send(&sock, &diag_request(BUSY_MASK))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut ids = Vec::new();
    loop {
        let n = diag_recv(&sock, &mut buf)?;
        let done = ids_in_dump(&buf[..n], port, &mut ids)?;
        if done || n == 0 {
            return Ok(ids);
        }
    }
}

/// A TCP socket as `sock_diag` names it: its `inet_diag_sockid` (ports, addresses, interface;
/// the cookie left out, so a request socket and the connection it became are one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SockId([u8; 40]);

/// Which of `ids` are still busy, each looked up by its addresses and ports (a hash lookup in
/// the kernel, not a walk of the table); an error when a lookup failed for another reason
/// than the socket being gone.
fn still_busy_here(ids: &[SockId]) -> std::io::Result<Vec<SockId>> {
    let sock = diag_socket()?;
    let mut buf = vec![0u8; 8 * 1024];
    let mut busy = Vec::new();
    for id in ids {
        diag_send(&sock, &lookup_request(id))?;
        let n = diag_recv(&sock, &mut buf)?;
        let m = &buf[..n];
        if m.len() < 18 {
            return Err(std::io::Error::other("short sock_diag answer"));
        }
        match u16::from_ne_bytes([m[4], m[5]]) {
            2 => {
                let errno = -i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
                if errno != libc::ENOENT {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
            }
            _ if BUSY_MASK & 1u32.checked_shl(u32::from(m[17])).unwrap_or(0) != 0 => busy.push(*id),
            _ => {}
        }
    }
    Ok(busy)
}

/// A `SOCK_DIAG_BY_FAMILY` request for the one IPv4 TCP socket `id` (no cookie).
fn lookup_request(id: &SockId) -> [u8; 72] {
    let mut r = diag_request(BUSY_MASK);
    r[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    r[24..64].copy_from_slice(&id.0);
    r[64..72].fill(0xff); // INET_DIAG_NOCOOKIE
    r
}

/// Follows the old LC's busy connections through a drain: one dump of the socket table
/// finds them, then each is looked up by itself until none is busy, and a last dump confirms
/// that none is left (a connection that started meanwhile is found there and followed the
/// same way). A drain polled by dumps alone walked the whole table, with every `TIME_WAIT`
/// socket of every namespace, every half millisecond: milliseconds each at 5,000 new
/// connections per second, competing with the service for the CPU (issue 26). An error
/// counts as busy, so a drain never ends on one.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    tracked: Vec<SockId>,
}

impl Drain {
    /// The busy connections on `port` now (see the type); run in the LC's namespace.
    pub(crate) fn poll_here(&mut self, port: u16) -> usize {
        if !self.tracked.is_empty() {
            match still_busy_here(&self.tracked) {
                Ok(left) => self.tracked = left,
                Err(_) => self.tracked.clear(),
            }
            if !self.tracked.is_empty() {
                return self.tracked.len();
            }
        }
        match busy_ids_here(port) {
            Ok(ids) => {
                self.tracked = ids;
                self.tracked.len()
            }
            Err(_) => usize::MAX,
        }
    }
}

/// A `SOCK_DIAG_BY_FAMILY` dump request for IPv4 TCP sockets in the states of `mask`.
fn diag_request(mask: u32) -> [u8; 72] {
    let mut r = [0u8; 72];
    r[0..4].copy_from_slice(&72u32.to_ne_bytes());
    r[4..6].copy_from_slice(&20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    r[6..8].copy_from_slice(&flags.to_ne_bytes());
    r[16] = libc::AF_INET as u8;
    r[17] = libc::IPPROTO_TCP as u8;
    r[20..24].copy_from_slice(&mask.to_ne_bytes());
    r
}

/// Counts sockets with local `port` in one buffer of dump replies; `true` once the dump is done.
#[cfg(test)]
fn count_in_dump(buf: &[u8], port: u16) -> std::io::Result<(usize, bool)> {
    let mut ids = Vec::new();
    let done = ids_in_dump(buf, port, &mut ids)?;
    Ok((ids.len(), done))
}

/// Adds the sockets with local `port` in one buffer of dump replies to `ids`; `true` once the
/// dump is done.
fn ids_in_dump(mut buf: &[u8], port: u16, ids: &mut Vec<SockId>) -> std::io::Result<bool> {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            break;
        }
        match kind {
            3 => return Ok(true), // NLMSG_DONE
            2 => {
                // NLMSG_ERROR
                let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                return Err(std::io::Error::from_raw_os_error(-errno));
            }
            _ => {
                // inet_diag_msg: family, state, timer, retrans, then the socket id (sport first).
                if len >= 16 + 44 && u16::from_be_bytes([buf[20], buf[21]]) == port {
                    let mut id = [0u8; 40];
                    id.copy_from_slice(&buf[20..60]);
                    ids.push(SockId(id));
                }
            }
        }
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
    }
    Ok(false)
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

    /// Counts busy TCP connections on `port` (see [`busy_tcp_connections`]); a failed query
    /// counts as busy, so a drain never ends on an error.
    pub fn busy_tcp_connections(&self, port: u16) -> Result<usize, NetnsError> {
        self.run(move || busy_here(port).unwrap_or(usize::MAX))
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
pub(crate) mod tests {
    use super::*;

    fn msg(kind: u16, sport: u16) -> Vec<u8> {
        let mut m = vec![0u8; 16 + 72];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[20..22].copy_from_slice(&sport.to_be_bytes());
        m
    }

    #[test]
    fn counts_dump_entries_on_the_port_until_done() {
        let mut buf = msg(20, 8080);
        buf.extend(msg(20, 22));
        buf.extend(msg(20, 8080));
        assert_eq!(count_in_dump(&buf, 8080).unwrap(), (2, false));
        buf.extend(msg(3, 0));
        assert_eq!(count_in_dump(&buf, 8080).unwrap(), (2, true));
        assert_eq!(count_in_dump(&buf, 9).unwrap(), (0, true));
    }

    #[test]
    fn request_asks_for_ipv4_tcp_in_busy_states() {
        let r = diag_request(BUSY_MASK);
        assert_eq!(u32::from_ne_bytes([r[0], r[1], r[2], r[3]]), 72);
        assert_eq!(
            (r[16], r[17]),
            (libc::AF_INET as u8, libc::IPPROTO_TCP as u8)
        );
        let mask = u32::from_ne_bytes([r[20], r[21], r[22], r[23]]);
        assert_eq!(mask & (1 << 6), 0, "TIME_WAIT is not busy");
        assert_ne!(mask & (1 << 1), 0, "ESTABLISHED is busy");
    }

    /// Field `n` (1-based, as in proc(5)) of a `/proc/<pid>/stat` line.
    pub(crate) fn stat_field(stat: &str, n: usize) -> &str {
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.split(' ').nth(n - 3).unwrap()
    }

    /// The scheduling policy (field 41 of `/proc/<pid>/stat`) of the process `cmd` starts.
    fn policy_of(mut cmd: std::process::Command) -> i64 {
        let out = cmd.arg("/proc/self/stat").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        stat_field(&String::from_utf8(out.stdout).unwrap(), 41)
            .parse()
            .unwrap()
    }

    #[test]
    fn idle_commands_run_under_sched_idle_in_the_namespace() {
        let idle = i64::from(libc::SCHED_IDLE);
        assert_ne!(policy_of(command_in(None, "cat").unwrap()), idle);
        assert_eq!(policy_of(idle_command_in(None, "cat").unwrap()), idle);
        // Through `nsenter` too (needs root, like the switch itself).
        let ns = Path::new("/proc/self/ns/net");
        assert_eq!(policy_of(idle_command_in(Some(ns), "cat").unwrap()), idle);
        // SAFETY: reads the calling thread's policy.
        let mine = unsafe { libc::sched_getscheduler(0) };
        assert_ne!(mine, libc::SCHED_IDLE, "only the child runs idle");
    }

    #[test]
    fn counts_a_real_established_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(busy_tcp_connections(None, port).unwrap(), 0);
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(busy_tcp_connections(None, port).unwrap(), 1);
        drop((c, s));
    }

    /// Issue 26: a drain finds the busy connections by one dump, follows each by a lookup of
    /// its own, sees one that starts meanwhile at the confirming dump, and ends at 0 only
    /// when a dump finds none.
    #[test]
    fn a_drain_follows_each_connection_until_a_dump_finds_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut d = Drain::default();
        let c1 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s1, _) = l.accept().unwrap();
        let c2 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s2, _) = l.accept().unwrap();
        assert_eq!(d.poll_here(port), 2);
        // Looked up one by one: the same two, still busy.
        assert_eq!(still_busy_here(&d.tracked).unwrap().len(), 2);
        assert_eq!(d.poll_here(port), 2);
        // One ends (the server's side closes first: FIN_WAIT2 / TIME_WAIT are not busy).
        drop(s1);
        drop(c1);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(d.poll_here(port), 1);
        // A connection that started meanwhile is found once the followed one ended.
        let c3 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s3, _) = l.accept().unwrap();
        drop(s2);
        drop(c2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(d.poll_here(port), 1, "the dump found the new one");
        drop(s3);
        drop(c3);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(d.poll_here(port), 0);
        assert!(d.tracked.is_empty());
    }
}
