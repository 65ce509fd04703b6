//! Real PgBouncer and PostgreSQL processes on the host, for the tests and the demo: a
//! PgBouncer in transaction pooling pointed at an address (the service address, in the demo),
//! and a throw-away PostgreSQL cluster on a loopback port (for the front's own tests).
//!
//! Both run as the `postgres` user (PgBouncer refuses root; so does PostgreSQL), from Debian's
//! packages (`pgbouncer`, `postgresql-15`); their files live in a directory of the caller's,
//! owned by that user. Dropping the handle stops the process and waits for it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wire::{Conn, Login};

/// Where Debian puts PostgreSQL 15's programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A process could not be started or did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "no user {0:?} on this host (install postgresql-15 and pgbouncer: scripts/install-deps)"
    )]
    NoUser(String),
    #[error("cannot prepare {path}")]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {program} (install it: scripts/install-deps)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {output}")]
    Failed { program: String, output: String },
    #[error("{what} did not answer on {addr} within {waited:?}; its log {log}: {tail}")]
    NotUp {
        what: &'static str,
        addr: SocketAddr,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },
}

/// The uid and gid of `name`.
pub fn user_ids(name: &str) -> Result<(u32, u32), ProcessError> {
    let c = std::ffi::CString::new(name).map_err(|_| ProcessError::NoUser(name.into()))?;
    // SAFETY: getpwnam reads a NUL-terminated name and returns a pointer into static storage
    // (or null); both fields are copied out before any other call could reuse it.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(ProcessError::NoUser(name.into()));
    }
    // SAFETY: not null, checked above.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A free TCP port on the loopback (the kernel's pick; free when this returns).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `dir`, created and owned by `postgres`.
fn own_dir(dir: &Path, ids: (u32, u32)) -> Result<(), ProcessError> {
    let err = |source| ProcessError::Files {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::os::unix::fs::chown(dir, Some(ids.0), Some(ids.1)).map_err(err)
}

fn write_owned(path: &Path, text: &str, ids: (u32, u32)) -> Result<(), ProcessError> {
    let err = |source| ProcessError::Files {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, text).map_err(err)?;
    std::os::unix::fs::chown(path, Some(ids.0), Some(ids.1)).map_err(err)
}

fn as_postgres(program: &str, ids: (u32, u32)) -> Command {
    let mut c = Command::new(program);
    c.uid(ids.0).gid(ids.1).env("LC_ALL", "C.UTF-8");
    c
}

/// The last lines of a log, for an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Waits until `login` logs in (and answers `sql`).
fn wait_up(
    what: &'static str,
    login: &Login<'_>,
    sql: &str,
    log: &Path,
    patience: Duration,
) -> Result<(), ProcessError> {
    let t0 = Instant::now();
    loop {
        if Conn::connect(login).and_then(|mut c| c.query(sql)).is_ok() {
            return Ok(());
        }
        if t0.elapsed() > patience {
            return Err(ProcessError::NotUp {
                what,
                addr: login.addr,
                waited: patience,
                log: log.to_owned(),
                tail: tail(log),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running PgBouncer (transaction pooling) on `127.0.0.1:port`.
#[derive(Debug)]
pub struct PgBouncerProcess {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

/// What a started PgBouncer serves.
#[derive(Debug, Clone)]
pub struct BouncerSpec<'a> {
    /// Its files (ini, users, log) go here.
    pub dir: &'a Path,
    pub port: u16,
    /// Where its pools connect: the service address.
    pub target: SocketAddr,
    /// The databases it pools (same name on the server), and the user they log in as.
    pub databases: &'a [&'a str],
    pub server_user: &'a str,
    /// Server connections per pool.
    pub pool_size: u32,
}

impl PgBouncerProcess {
    /// Writes its ini (`auth_type = trust` for the loopback, admin user `pgbouncer`), starts
    /// it and waits until its admin console answers.
    pub fn start(spec: &BouncerSpec<'_>) -> Result<PgBouncerProcess, ProcessError> {
        let ids = user_ids("postgres")?;
        own_dir(spec.dir, ids)?;
        let ini = spec.dir.join("pgbouncer.ini");
        let log = spec.dir.join("pgbouncer.log");
        let dbs: String = spec
            .databases
            .iter()
            .map(|d| {
                format!(
                    "{d} = host={} port={} dbname={d} user={}\n",
                    spec.target.ip(),
                    spec.target.port(),
                    spec.server_user
                )
            })
            .collect();
        let users = format!("\"pgbouncer\" \"\"\n\"{}\" \"\"\n", spec.server_user);
        write_owned(&spec.dir.join("users.txt"), &users, ids)?;
        write_owned(&ini, &bouncer_ini(spec, &dbs, &log), ids)?;
        let child = as_postgres("pgbouncer", ids)
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: "pgbouncer".into(),
                source,
            })?;
        let me = PgBouncerProcess {
            child,
            port: spec.port,
            dir: spec.dir.to_owned(),
        };
        let login = me.admin_login();
        wait_up(
            "PgBouncer",
            &login,
            "SHOW VERSION",
            &log,
            Duration::from_secs(10),
        )?;
        Ok(me)
    }

    /// The admin console's login.
    pub fn admin_login(&self) -> Login<'static> {
        Login {
            addr: self.addr(),
            user: "pgbouncer",
            database: "pgbouncer",
            password: None,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }
}

fn bouncer_ini(spec: &BouncerSpec<'_>, dbs: &str, log: &Path) -> String {
    format!(
        "[databases]\n{dbs}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
         unix_socket_dir =\nauth_type = trust\nauth_file = {users}\nadmin_users = pgbouncer\n\
         pool_mode = transaction\ndefault_pool_size = {pool}\nmax_client_conn = 200\n\
         server_connect_timeout = 5\nserver_login_retry = 1\nquery_wait_timeout = 0\n\
         logfile = {log}\n",
        port = spec.port,
        users = spec.dir.join("users.txt").display(),
        pool = spec.pool_size,
        log = log.display(),
    )
}

impl Drop for PgBouncerProcess {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL after 5 s; waits for the end.
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A throw-away PostgreSQL 15 cluster (trust auth) on `127.0.0.1:port`.
#[derive(Debug)]
pub struct ScratchPostgres {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl ScratchPostgres {
    /// `initdb` into `dir/data`, then `postgres` in the foreground of a child of ours.
    pub fn start(dir: &Path, port: u16) -> Result<ScratchPostgres, ProcessError> {
        let ids = user_ids("postgres")?;
        own_dir(dir, ids)?;
        let data = dir.join("data");
        initdb(&data, ids)?;
        let log = dir.join("postgres.log");
        let log_file = std::fs::File::create(&log).map_err(|source| ProcessError::Files {
            path: log.clone(),
            source,
        })?;
        let err_file = log_file.try_clone().map_err(|source| ProcessError::Files {
            path: log.clone(),
            source,
        })?;
        let postgres = format!("{PG_BIN}/postgres");
        let child = as_postgres(&postgres, ids)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: postgres,
                source,
            })?;
        let me = ScratchPostgres {
            child,
            port,
            dir: dir.to_owned(),
        };
        wait_up(
            "PostgreSQL",
            &me.login("postgres"),
            "SELECT 1",
            &log,
            Duration::from_secs(30),
        )?;
        Ok(me)
    }

    /// A login as `postgres` to `database`.
    pub fn login<'a>(&self, database: &'a str) -> Login<'a> {
        Login {
            addr: (Ipv4Addr::LOCALHOST, self.port).into(),
            user: "postgres",
            database,
            password: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A new cluster in `data`: trust auth, superuser `postgres`.
fn initdb(data: &Path, ids: (u32, u32)) -> Result<(), ProcessError> {
    let initdb = format!("{PG_BIN}/initdb");
    let out = as_postgres(&initdb, ids)
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(data)
        .output()
        .map_err(|source| ProcessError::Spawn {
            program: initdb.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProcessError::Failed {
            program: initdb,
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        // SIGTERM is PostgreSQL's smart shutdown; SIGINT is fast (what a test wants).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        stop(&mut self.child);
    }
}
