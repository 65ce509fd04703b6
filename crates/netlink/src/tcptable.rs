//! A network namespace with a TCP socket table of its own (issue 26).
//!
//! Why: a switch's drain looks at the old LC's busy TCP connections with `sock_diag`, and a
//! look walks the kernel's whole TCP hash table — every bucket, and every socket of every
//! namespace in it, `TIME_WAIT` ones included. With the host's one global table that walk
//! was most of the pause in `path` and `readdress` (bench switch at 5,000 req/s: the drain's
//! first look 6–11 ms p50, the pause p99 18–32 ms). Since Linux 6.1 a namespace can have
//! its own table (`net.ipv4.tcp_child_ehash_entries`, read from the namespace of the task
//! that creates the new one): a look then walks only the LC's own sockets.
//!
//! The sysctl is the *creating* namespace's, so it is never set on the host: the new
//! namespace is created from a scratch namespace that has it set, which is dropped at once.
//! A namespace with its own table gets limits sized from it (`tcp_max_tw_buckets` half the
//! table, `tcp_max_syn_backlog` table/128); they are set back to the host's values, so the
//! LC's TCP behaves as it did with the shared table. On a kernel without the sysctl the
//! namespace keeps the shared table (nothing else changes) and the caller is told.

use std::path::Path;

use nix::sched::{CloneFlags, unshare};

/// Buckets of an LC's own TCP table: 64 Ki buckets (512 KiB), as large as the busiest LC
/// here needs and small enough that a walk of the empty ones costs well under a millisecond
/// (bench switch, docs/network-switch.md "The drain's look at the TCP table").
pub const LC_TCP_TABLE_BUCKETS: u32 = 65536;

const CHILD_EHASH: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";
/// The limits a namespace with its own table sizes from it, set back to the host's values.
const KEPT_LIMITS: [&str; 2] = [
    "/proc/sys/net/ipv4/tcp_max_tw_buckets",
    "/proc/sys/net/ipv4/tcp_max_syn_backlog",
];

/// Creating a namespace with its own table failed.
#[derive(Debug, thiserror::Error)]
pub enum TcpTableError {
    #[error("unshare({what})")]
    Unshare {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{path}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the new namespace got a table of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpTable {
    Own,
    /// The kernel has no per-namespace table (before 6.1): the shared one.
    Shared,
}

/// `unshare(flags)` for the calling thread, where `flags` include `CLONE_NEWNET`, so that the
/// new network namespace has a TCP table of `buckets` of its own. The calling thread must be
/// in the namespace whose limits the new one keeps (the host's).
pub fn unshare_with_own_tcp_table(
    flags: CloneFlags,
    buckets: u32,
) -> Result<TcpTable, TcpTableError> {
    let kept = read_limits()?;
    let table = enter_scratch(buckets)?;
    unshare(flags).map_err(|source| TcpTableError::Unshare {
        what: "the LC's namespaces",
        source,
    })?;
    if table == TcpTable::Own {
        write_limits(&kept)?;
    }
    Ok(table)
}

/// Runs `create` (which makes a new network namespace, e.g. `ip netns add`) on a thread in a
/// scratch namespace whose new namespaces get a TCP table of `buckets` of their own; then
/// sets the host's limits in the namespace at `made`, when `create` made it (see the module
/// doc).
pub fn create_with_own_tcp_table<T: Send>(
    buckets: u32,
    made: &Path,
    create: impl FnOnce() -> T + Send,
) -> Result<(T, TcpTable), TcpTableError> {
    let kept = read_limits()?;
    let (out, table) = std::thread::scope(|s| {
        s.spawn(|| -> Result<(T, TcpTable), TcpTableError> {
            let table = enter_scratch(buckets)?;
            // The thread ends here, and the scratch namespace with it.
            Ok((create(), table))
        })
        .join()
        .expect("the scratch-namespace thread does not panic")
    })?;
    // `create` may have failed (its result says how): then there is nothing to set.
    if table == TcpTable::Own && made.exists() {
        crate::netns::in_netns(Some(made), || write_limits(&kept)).map_err(|e| {
            TcpTableError::Sysctl {
                path: KEPT_LIMITS[0],
                source: std::io::Error::other(e),
            }
        })??;
    }
    Ok((out, table))
}

/// Moves the calling thread into a fresh scratch network namespace whose new namespaces get
/// a TCP table of `buckets` of their own (`Shared`: the kernel has no such sysctl).
fn enter_scratch(buckets: u32) -> Result<TcpTable, TcpTableError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(|source| TcpTableError::Unshare {
        what: "a scratch network namespace",
        source,
    })?;
    match std::fs::write(CHILD_EHASH, buckets.to_string()) {
        Ok(()) => Ok(TcpTable::Own),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TcpTable::Shared),
        Err(source) => Err(TcpTableError::Sysctl {
            path: CHILD_EHASH,
            source,
        }),
    }
}

fn read_limits() -> Result<[String; 2], TcpTableError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| TcpTableError::Sysctl { path, source })
    };
    Ok([read(KEPT_LIMITS[0])?, read(KEPT_LIMITS[1])?])
}

fn write_limits(values: &[String; 2]) -> Result<(), TcpTableError> {
    for (path, v) in KEPT_LIMITS.iter().zip(values) {
        std::fs::write(path, v).map_err(|source| TcpTableError::Sysctl { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace made this way has its own table (the kernel sizes `tcp_max_tw_buckets`
    /// from the table only then), keeps the host's limits, and the host's sysctl is untouched.
    #[test]
    fn a_namespace_gets_its_own_tcp_table_and_keeps_the_hosts_limits() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let host_child = std::fs::read_to_string(CHILD_EHASH).ok();
        let host = read_limits().unwrap();
        let seen = std::thread::spawn(|| {
            let table = unshare_with_own_tcp_table(CloneFlags::CLONE_NEWNET, 1024).unwrap();
            (table, read_limits().unwrap())
        })
        .join()
        .unwrap();
        let Some(_) = host_child else {
            assert_eq!(seen.0, TcpTable::Shared);
            return;
        };
        assert_eq!(seen.0, TcpTable::Own);
        assert_eq!(seen.1, host, "the LC keeps the host's limits");
        assert_eq!(std::fs::read_to_string(CHILD_EHASH).ok(), host_child);
        // Without the limits set back, the kernel would have sized them from 1024 buckets:
        // the check above can fail.
        let bare = std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            std::fs::write(CHILD_EHASH, "1024").unwrap();
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            read_limits().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(bare[0], "512", "{bare:?}");
    }
}
