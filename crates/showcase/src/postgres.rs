//! PostgreSQL under pgbench through PgBouncer (docs/postgres.md): a Debian LC's tree made
//! into a PostgreSQL LC (the cluster's data on the application disk), the service's
//! `[service]` section, Debian's `pgbench` with a fixed command line, and the set check that
//! counts acknowledged commits the database does not have.
//!
//! The set check: every pgbench client inserts `(client_id, n)` with `n` its own transaction
//! number (1, 2, …), one row per transaction. pgbench's per-transaction log (`-l`) names each
//! transaction it saw commit (`client_id transaction_no latency …`); every one of those rows
//! must be in the table afterwards, read from whichever LC is active then.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patchover_front::wire::{Conn, Login};
use serde_json::json;

use crate::{Context, ShowcaseError};

/// The cluster's data directory inside the LC: the application disk is mounted at `/data`.
pub const DATA_DIR: &str = "/data/15/main";

/// The `[service]` of a PostgreSQL LC behind a PgBouncer at `front` (docs/postgres.md). The
/// hooks are the LC's `/usr/local/sbin/po-pg` ([`PO_PG`]).
pub fn service_section(front: SocketAddr, pause_deadline_secs: u64) -> String {
    format!(
        "\n# PostgreSQL 15 (Debian's), its data on the application disk; clients through PgBouncer.\n\
         [service]\nport = 5432\n\
         health = {{ kind = \"command\", command = [\"pg_isready\", \"-q\", \"-h\", \"127.0.0.1\", \"-p\", \"5432\"], patience_secs = 10 }}\n\
         stop = [\"{PO_PG_PATH}\", \"stop\"]\ncut_check = [\"{PO_PG_PATH}\", \"cut-check\"]\n\
         restart = [\"{PO_PG_PATH}\", \"restart\"]\nresume = [\"{PO_PG_PATH}\", \"resume\"]\n\n\
         [service.front]\nkind = \"pgbouncer\"\nadmin = \"{front}\"\nuser = \"pgbouncer\"\npause_deadline_secs = {pause_deadline_secs}\n"
    )
}

/// Where [`PO_PG`] goes in the LC.
pub const PO_PG_PATH: &str = "/usr/local/sbin/po-pg";

/// The service's hooks in the LC, one program: PostgreSQL's own `pg_ctl` as `postgres`
/// (Debian's `pg_ctlcluster start` reports a started server as failed when run through the
/// LC's exec: its wait loop gives up; `pg_ctl -w` waits on the server's own pid file).
/// `stop`: a fast shutdown (nothing to do when not running); `restart`: stopped if running,
/// started (on the data as of the cut); `resume`: started unless running; `cut-check`: the
/// cluster's identity, state and last checkpoint, failing unless it was shut down cleanly.
pub const PO_PG: &str = r#"#!/bin/sh
# patchover's service hooks for PostgreSQL 15 "main" (docs/postgres.md).
set -u
D=/data/15/main
B=/usr/lib/postgresql/15/bin
as_pg() { runuser -u postgres -- "$@"; }
running() { as_pg $B/pg_ctl -D $D status >/dev/null 2>&1; }
start() {
    install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    as_pg $B/pg_ctl -D $D -o "-c config_file=/etc/postgresql/15/main/postgresql.conf"         -l /var/log/postgresql/postgresql-15-main.log -w -t 60 start >/dev/null
}
stop() { as_pg $B/pg_ctl -D $D -m fast -w -t 60 stop >/dev/null; }
case "${1:-}" in
    stop) running || exit 0; stop ;;
    restart) if running; then stop || exit 1; fi; start ;;
    resume) running || start ;;
    cut-check)
        export LC_ALL=C
        s=$($B/pg_controldata $D) || exit 1
        printf '%s
' "$s" | grep -E '^(Database system identifier|Database cluster state|Latest checkpoint location):'
        printf '%s
' "$s" | grep -q '^Database cluster state: *shut down$' ;;
    *) echo "usage: $0 stop|restart|resume|cut-check" >&2; exit 2 ;;
esac
"#;

/// What the LC's PostgreSQL is told (conf.d is read after postgresql.conf).
const CONF: &str = "# patchover (docs/postgres.md): reached through the service address, small.\n\
listen_addresses = '*'\n\
shared_buffers = 32MB\n\
max_connections = 40\n";

/// The boot script that clears what a copied system disk brings of the old LC's PostgreSQL run.
const PGRUN: &str = "#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          patchover-pgrun\n# Required-Start:\n# Required-Stop:\n# Default-Start:     S\n# Default-Stop:\n# Short-Description: clears PostgreSQL's run files copied from another LC (patchover)\n### END INIT INFO\n[ \"$1\" = start ] || exit 0\nrm -f /run/postgresql/.s.PGSQL.*.lock /run/postgresql/.s.PGSQL.* /run/postgresql/*.pid\nexit 0\n";

/// Turns a Debian tree with postgresql-15 (`build-debian --packages postgresql-15`) into a
/// PostgreSQL LC: the cluster `15/main` moves to the application disk `app` (mounted at
/// `/data`), the system disk keeps a copy of the empty cluster under the mount point (what a
/// standby, booted without its application disk, serves its checks from), PostgreSQL listens
/// on every address and trusts the test network.
pub fn prepare_lc(sys: &Path, app: &Path) -> Result<(), ShowcaseError> {
    // Every file of the tree is reached through the root-confined handle: a link in the
    // image never leads the host out of it.
    let root = patchover_lcroot::LcRoot::open(sys)
        .with_context(|| format!("opening the system disk {}", sys.display()))?;
    let read = |rel: &str| -> Result<String, ShowcaseError> {
        let bytes = root.read_file(Path::new(rel), 1 << 20).with_context(|| {
            format!(
                "reading /{rel} of {} (is postgresql-15 in the image?)",
                sys.display()
            )
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let write = |rel: &str, text: &str, mode: u32| {
        root.write_file(Path::new(rel), text.as_bytes(), mode)
            .with_context(|| format!("writing /{rel} of {}", sys.display()))
    };
    let etc = "etc/postgresql/15/main";
    let conf: String = read(&format!("{etc}/postgresql.conf"))?
        .lines()
        .map(|l| match l.starts_with("data_directory") {
            true => format!("data_directory = '{DATA_DIR}'\t# patchover: the application disk\n"),
            false => format!("{l}\n"),
        })
        .collect();
    write(&format!("{etc}/postgresql.conf"), &conf, 0o644)?;
    write(&format!("{etc}/conf.d/patchover.conf"), CONF, 0o644)?;
    let mut hba = read(&format!("{etc}/pg_hba.conf"))?;
    hba.push_str("# patchover's test network: PgBouncer on the host, the switch's checks\nhost all all 0.0.0.0/0 trust\n");
    write(&format!("{etc}/pg_hba.conf"), &hba, 0o644)?;
    // Debian's boot clears no /run here (build-debian drops mountall's bootclean), and the
    // system disk is copied from a running LC: the socket's lock file names a PID of the old
    // LC, which may be another process in the standby. Cleared before PostgreSQL starts.
    write("etc/init.d/patchover-pgrun", PGRUN, 0o755)?;
    let link = Path::new("etc/rcS.d/S05patchover-pgrun");
    if root.stat(link).ok().flatten().is_none() {
        root.symlink(link, Path::new("../init.d/patchover-pgrun"))
            .with_context(|| format!("linking /{} of {}", link.display(), sys.display()))?;
    }
    write(PO_PG_PATH.trim_start_matches('/'), PO_PG, 0o755)?;
    let cluster = sys.join("var/lib/postgresql/15");
    for to in [app.to_owned(), sys.join("data")] {
        fs::create_dir_all(&to)?;
        cp_a(&cluster, &to)?;
    }
    Ok(())
}

fn cp_a(from: &Path, into: &Path) -> Result<(), ShowcaseError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(into)
        .output()
        .context("running cp")?;
    ensure!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        into.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The pgbench script: one transaction per run, a row `(client_id, n)`, `n` the client's own
/// transaction number (pgbench's `transaction_no` in its log).
pub const SCRIPT: &str =
    "\\set n :n + 1\nBEGIN;\nINSERT INTO po_acked (client, n) VALUES (:client_id, :n);\nEND;\n";

/// The table the script writes.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS po_acked (client int NOT NULL, n bigint NOT NULL, PRIMARY KEY (client, n))";

/// pgbench's load: clients, threads, seconds (`-c`, `-j`, `-T`).
#[derive(Debug, Clone, Copy)]
pub struct Bench {
    pub clients: u32,
    pub threads: u32,
    pub seconds: u64,
}

impl Bench {
    /// The documented command line (docs/postgres.md): `-c 8 -j 2 -M simple -T 60`.
    pub const DEMO: Bench = Bench {
        clients: 8,
        threads: 2,
        seconds: 60,
    };

    /// Debian's pgbench through the front at `front`, the set-check script, a log per
    /// transaction under `dir`, progress every second. No retries (`--max-tries` 1): a
    /// transaction that fails is counted as failed, not tried again.
    pub fn command(&self, front: SocketAddr, dir: &Path) -> Command {
        let mut c = Command::new("pgbench");
        c.args([
            "-h",
            &front.ip().to_string(),
            "-p",
            &front.port().to_string(),
        ])
        .args(["-U", "postgres", "-n", "-M", "simple", "-P", "1", "-l"])
        .args([
            "-c",
            &self.clients.to_string(),
            "-j",
            &self.threads.to_string(),
        ])
        .args(["-T", &self.seconds.to_string(), "-D", "n=0", "-f"])
        .arg(dir.join("acked.sql"))
        .arg(format!(
            "--log-prefix={}",
            dir.join("pgbench_log").display()
        ))
        .arg("postgres")
        .current_dir(dir);
        c
    }
}

/// What one pgbench run did, and what the set check found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BenchResult {
    pub transactions_total: u64,
    pub transactions_failed: u64,
    pub clients_aborted: u64,
    pub transactions_retried: u64,
    pub commits_acknowledged: u64,
    pub commits_lost: u64,
    /// Its summary, verbatim (standard output).
    pub pgbench: String,
    /// Per transaction: (end, latency), end in µs since the epoch.
    pub latencies: Vec<(u64, u64)>,
    /// The first lost rows, `(client, n)`.
    pub lost: Vec<(u32, u64)>,
    pub stderr_tail: String,
}

impl BenchResult {
    /// The largest latency of a transaction that ended in `[from, to]` (µs since the epoch),
    /// and the 99th percentile of those that ended outside it, in ms.
    pub fn pause_and_steady_p99(&self, from: u64, to: u64) -> (f64, f64) {
        let (inside, mut outside): (Vec<_>, Vec<_>) = self
            .latencies
            .iter()
            .partition(|(end, _)| (from..=to).contains(end));
        let pause = inside.iter().map(|(_, l)| *l).max().unwrap_or(0);
        outside.sort_by_key(|(_, l)| *l);
        let p99 = outside
            .get((outside.len() * 99 / 100).min(outside.len().saturating_sub(1)))
            .map_or(0, |(_, l)| *l);
        (pause as f64 / 1000.0, p99 as f64 / 1000.0)
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "transactions_total": self.transactions_total,
            "transactions_failed": self.transactions_failed,
            "clients_aborted": self.clients_aborted,
            "transactions_retried": self.transactions_retried,
            "commits_acknowledged": self.commits_acknowledged,
            "commits_lost": self.commits_lost,
            "lost_first": self.lost.iter().take(10).collect::<Vec<_>>(),
            "pgbench": self.pgbench,
        })
    }
}

/// Creates the set check's table through `login` (the front).
pub fn create_schema(login: &Login<'_>) -> Result<(), ShowcaseError> {
    Conn::connect(login)
        .and_then(|mut c| c.query(SCHEMA))
        .context("creating the set check's table")?;
    Ok(())
}

/// A pgbench running in the background.
pub struct Running {
    child: std::process::Child,
    dir: PathBuf,
    pub started: Instant,
}

/// Starts `bench` through `front`; its files go to `dir`.
pub fn start(bench: &Bench, front: SocketAddr, dir: &Path) -> Result<Running, ShowcaseError> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("acked.sql"), SCRIPT)?;
    let child = bench
        .command(front, dir)
        .stdout(fs::File::create(dir.join("pgbench.out"))?)
        .stderr(fs::File::create(dir.join("pgbench.err"))?)
        .spawn()
        .context("starting pgbench (install postgresql-client: scripts/install-deps)")?;
    Ok(Running {
        child,
        dir: dir.to_owned(),
        started: Instant::now(),
    })
}

impl Running {
    /// Waits for pgbench's end and reads its summary and logs; then the set check, through
    /// `login`.
    pub fn finish(mut self, login: &Login<'_>) -> Result<BenchResult, ShowcaseError> {
        self.child.wait().context("waiting for pgbench")?;
        let out = fs::read_to_string(self.dir.join("pgbench.out"))?;
        let err = fs::read_to_string(self.dir.join("pgbench.err"))?;
        let mut r = parse_summary(&out, &err);
        let acked = read_logs(&self.dir, &mut r.latencies)?;
        r.commits_acknowledged = acked.values().map(|s| s.len() as u64).sum();
        let present = present_rows(login)?;
        for (client, ns) in &acked {
            let have = present.get(client);
            for n in ns {
                if !have.is_some_and(|h| h.contains(n)) {
                    r.commits_lost += 1;
                    if r.lost.len() < 100 {
                        r.lost.push((*client, *n));
                    }
                }
            }
        }
        Ok(r)
    }
}

/// Every row of the set check's table, by client.
fn present_rows(login: &Login<'_>) -> Result<BTreeMap<u32, BTreeSet<u64>>, ShowcaseError> {
    let t0 = Instant::now();
    let rows = loop {
        match Conn::connect(login).and_then(|mut c| c.query("SELECT client, n FROM po_acked")) {
            Ok(rows) => break rows,
            Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                return Err(e).context("reading the set check's table");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut present: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for row in rows.rows {
        let num = |i: usize| {
            row.get(i)
                .cloned()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(c), Some(n)) = (num(0), num(1)) {
            present.entry(c as u32).or_default().insert(n);
        }
    }
    Ok(present)
}

/// pgbench's per-transaction logs under `dir`: the committed `(client, transaction_no)`s; each
/// transaction's end and latency into `latencies`.
fn read_logs(
    dir: &Path,
    latencies: &mut Vec<(u64, u64)>,
) -> Result<BTreeMap<u32, BTreeSet<u64>>, ShowcaseError> {
    let mut acked: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.starts_with("pgbench_log.") {
            continue;
        }
        for line in fs::read_to_string(&path)?.lines() {
            if let Some((client, n, end, latency)) = log_line(line) {
                acked.entry(client).or_default().insert(n);
                latencies.push((end, latency));
            }
        }
    }
    Ok(acked)
}

/// `client_id transaction_no latency_us script_no epoch_s epoch_us`: a committed transaction
/// (a failed or skipped one has a word for its latency and is not returned).
fn log_line(line: &str) -> Option<(u32, u64, u64, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let client = f.first()?.parse().ok()?;
    let n = f.get(1)?.parse().ok()?;
    let latency: u64 = f.get(2)?.parse().ok()?;
    let end = f.get(4)?.parse::<u64>().ok()? * 1_000_000 + f.get(5)?.parse::<u64>().ok()?;
    Some((client, n, end, latency))
}

/// The counts in pgbench's summary (standard output) and its errors (standard error).
fn parse_summary(out: &str, err: &str) -> BenchResult {
    let count = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.trim_end_matches('/').parse::<u64>().ok())
            .unwrap_or(0)
    };
    let aborted = err
        .lines()
        .filter(|l| l.contains("client ") && l.contains(" aborted"))
        .count() as u64;
    let tail: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("progress:"))
        .collect();
    BenchResult {
        transactions_total: count("number of transactions actually processed:"),
        transactions_failed: count("number of failed transactions:"),
        transactions_retried: count("number of transactions retried:"),
        clients_aborted: aborted,
        pgbench: out.to_owned(),
        stderr_tail: tail[tail.len().saturating_sub(10)..].join("\n"),
        ..BenchResult::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))\ntransaction type: acked.sql\nmaximum number of tries: 1\nduration: 3 s\nnumber of transactions actually processed: 12139\nnumber of failed transactions: 2 (0.016%)\nlatency average = 0.981 ms\n";

    #[test]
    fn the_summary_and_the_aborted_clients_are_counted() {
        let err = "progress: 1.0 s, 3938.6 tps\npgbench: error: client 3 aborted in command 2 (SQL) of script 0; FATAL:  terminating connection\npgbench: error: client 5 aborted in command 1 (SQL) of script 0; x\n";
        let r = parse_summary(OUT, err);
        assert_eq!(
            (
                r.transactions_total,
                r.transactions_failed,
                r.clients_aborted
            ),
            (12139, 2, 2)
        );
        assert_eq!(r.transactions_retried, 0);
        assert_eq!(r.pgbench, OUT);
        assert!(!r.stderr_tail.contains("progress:"));
    }

    #[test]
    fn log_lines_of_committed_transactions_only() {
        assert_eq!(
            log_line("3 17 5422 0 1796650971 856366"),
            Some((3, 17, 1_796_650_971_856_366, 5422))
        );
        assert_eq!(log_line("3 18 failed 0 1796650971 856366"), None);
        assert_eq!(log_line("3 19 skipped 0 1796650971 856366"), None);
        assert_eq!(log_line("garbage"), None);
    }

    #[test]
    fn the_pause_is_the_slowest_transaction_in_the_window() {
        let r = BenchResult {
            latencies: (0..200u64)
                .map(|i| (i * 10, 1000 + i))
                .chain([(1005, 2_500_000)])
                .collect(),
            ..BenchResult::default()
        };
        let (pause, p99) = r.pause_and_steady_p99(1000, 1010);
        assert_eq!(pause, 2500.0);
        assert!((1.19..1.2).contains(&p99), "{p99}");
    }
}
