//! The connection front patchover drives in the switch window (`[service.front]`,
//! docs/postgres.md).
//!
//! A database connection lives for a whole session, so holding new connections (the switcher's
//! SYN hold) is not enough to move a database without failing its clients: a session on the old
//! server ends when that server stops. A pooler in transaction mode owns the clients' sessions
//! and uses a server connection per transaction only; told to `PAUSE` it finishes the running
//! transactions, holds every new one and closes its server connections, and after `RESUME` it
//! continues on new server connections — to the standby, once the service address moved.
//! [`PgBouncer`] is that front, driven through its admin console ([`wire`]).
//!
//! [`Front`] is the seam the orchestrator calls, so its order of calls is tested without a
//! PgBouncer; [`process`] starts real PgBouncer and PostgreSQL processes for tests and the demo.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub mod process;
pub mod wire;

pub use wire::WireError;

/// What the switch asks of a front.
pub trait Front {
    /// For messages: `pgbouncer at ADDR`.
    fn describe(&self) -> String;
    /// Before anything changes: the front answers, is what the config says, and its pools
    /// point at `service` (so they follow the switch). Returns its version.
    fn check(&self, service: SocketAddr) -> Result<String, FrontError>;
    /// Finishes the running transactions, holds new ones, closes the server connections.
    /// Past the deadline it resumes the front and fails with [`FrontError::PauseTimeout`].
    fn pause(&self) -> Result<Duration, FrontError>;
    /// Lets held transactions go (to whatever the service address reaches now). `Ok(false)`:
    /// it was not paused, nothing to do (so it can be called again, e.g. by recovery).
    fn resume(&self) -> Result<bool, FrontError>;
    /// After the switch: no server connection of before survives (`RECONNECT`), then `resume`.
    fn release(&self) -> Result<(), FrontError>;
    /// The shell command an operator runs to let a front left paused go (after `PAUSE` it has
    /// no server connection, so a `RESUME` connects to whatever serves the address now).
    fn resume_command(&self) -> String;
}

/// The front failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("the front {front} cannot be reached; start it or fix [service.front] admin")]
    Unreachable {
        front: String,
        #[source]
        source: Box<WireError>,
    },
    #[error(
        "the front at {addr} is not PgBouncer (SHOW VERSION answered {version:?}); fix [service.front] admin"
    )]
    NotPgBouncer { addr: SocketAddr, version: String },
    #[error(
        "the front {front}: {problem}; a front that does not point at the service address {service} would not follow the switch"
    )]
    WrongTarget {
        front: String,
        service: SocketAddr,
        problem: String,
    },
    #[error(
        "the front {front} did not finish its running transactions within {deadline:?} (a transaction longer than the pause deadline); {resumed}"
    )]
    PauseTimeout {
        front: String,
        deadline: Duration,
        /// What became of the front: resumed, or why not.
        resumed: String,
    },
    #[error("the front {front}: {command} failed")]
    Command {
        front: String,
        command: String,
        #[source]
        source: Box<WireError>,
    },
}

/// PgBouncer (1.18 and later), driven through its admin console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBouncer {
    /// Its listen address, from the host.
    pub admin: SocketAddr,
    /// A name in its `admin_users`.
    pub user: String,
    pub password: Option<String>,
    /// Pause, reconnect and resume only this database; every database when `None`.
    pub database: Option<String>,
    /// How long `PAUSE` may wait for running transactions.
    pub pause_deadline: Duration,
}

/// How long a connect or an admin command other than `PAUSE` may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

impl PgBouncer {
    fn conn(&self) -> Result<wire::Conn, FrontError> {
        wire::Conn::connect(&wire::Login {
            addr: self.admin,
            user: &self.user,
            database: "pgbouncer",
            password: self.password.as_deref(),
            timeout: ADMIN_TIMEOUT,
        })
        .map_err(|source| FrontError::Unreachable {
            front: self.describe(),
            source: Box::new(source),
        })
    }

    /// `VERB` or `VERB db`.
    fn command(&self, verb: &str) -> String {
        match &self.database {
            Some(db) => format!("{verb} {}", quote_ident(db)),
            None => verb.to_owned(),
        }
    }

    fn run(&self, conn: &mut wire::Conn, sql: &str) -> Result<wire::Rows, FrontError> {
        conn.query(sql).map_err(|source| FrontError::Command {
            front: self.describe(),
            command: sql.to_owned(),
            source: Box::new(source),
        })
    }

    /// Its pools: `(name, host, port)` of every database but the console's own.
    pub fn databases(&self) -> Result<Vec<(String, String, String)>, FrontError> {
        let rows = self.run(&mut self.conn()?, "SHOW DATABASES")?;
        let col = |c: &str| {
            rows.column(c).ok_or_else(|| FrontError::Command {
                front: self.describe(),
                command: "SHOW DATABASES".into(),
                source: Box::new(WireError::Protocol {
                    addr: self.admin,
                    message: format!("no column {c:?}"),
                }),
            })
        };
        let (names, hosts, ports) = (col("name")?, col("host")?, col("port")?);
        Ok(names
            .into_iter()
            .zip(hosts)
            .zip(ports)
            .filter(|((n, _), _)| *n != Some("pgbouncer"))
            .map(|((n, h), p)| {
                let s = |v: Option<&str>| v.unwrap_or_default().to_owned();
                (s(n), s(h), s(p))
            })
            .collect())
    }

    fn wrong_target(&self, service: SocketAddr, problem: String) -> FrontError {
        FrontError::WrongTarget {
            front: self.describe(),
            service,
            problem,
        }
    }
}

impl Front for PgBouncer {
    fn describe(&self) -> String {
        format!("pgbouncer at {}", self.admin)
    }

    fn check(&self, service: SocketAddr) -> Result<String, FrontError> {
        let version = self
            .run(&mut self.conn()?, "SHOW VERSION")?
            .rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default();
        if !version.starts_with("PgBouncer") {
            return Err(FrontError::NotPgBouncer {
                addr: self.admin,
                version,
            });
        }
        let pools = self.databases()?;
        let ours: Vec<_> = pools
            .iter()
            .filter(|(n, _, _)| self.database.as_ref().is_none_or(|d| d == n))
            .collect();
        if ours.is_empty() {
            let want = self.database.as_deref().unwrap_or("any database");
            return Err(self.wrong_target(service, format!("has no pool for {want}")));
        }
        for (name, host, port) in ours {
            if *host != service.ip().to_string() || *port != service.port().to_string() {
                return Err(
                    self.wrong_target(service, format!("database {name} points at {host}:{port}"))
                );
            }
        }
        Ok(version)
    }

    fn pause(&self) -> Result<Duration, FrontError> {
        let t0 = Instant::now();
        let mut conn = self.conn()?;
        let sql = self.command("PAUSE");
        let _ = conn.set_timeout(
            self.pause_deadline
                .saturating_sub(t0.elapsed())
                .max(Duration::from_millis(1)),
        );
        match conn.query(&sql) {
            Ok(_) => Ok(t0.elapsed()),
            Err(e) if e.timed_out() => {
                drop(conn);
                let resumed = match self.resume() {
                    Ok(_) => "it was resumed, nothing changed".to_owned(),
                    Err(e) => format!("resuming it failed too: {}", chain(&e)),
                };
                tracing::warn!(front = %self.describe(), deadline = ?self.pause_deadline, %resumed, "the front's pause ran out");
                Err(FrontError::PauseTimeout {
                    front: self.describe(),
                    deadline: self.pause_deadline,
                    resumed,
                })
            }
            Err(source) => Err(FrontError::Command {
                front: self.describe(),
                command: sql,
                source: Box::new(source),
            }),
        }
    }

    fn resume(&self) -> Result<bool, FrontError> {
        let sql = self.command("RESUME");
        match self.conn()?.query(&sql) {
            Ok(_) => Ok(true),
            Err(e) if e.server_message().is_some_and(not_paused) => Ok(false),
            Err(source) => Err(FrontError::Command {
                front: self.describe(),
                command: sql,
                source: Box::new(source),
            }),
        }
    }

    fn release(&self) -> Result<(), FrontError> {
        let mut conn = self.conn()?;
        self.run(&mut conn, &self.command("RECONNECT"))?;
        drop(conn);
        self.resume().map(|_| ())
    }

    fn resume_command(&self) -> String {
        let login = format!(
            "host={} port={} user={} dbname=pgbouncer",
            self.admin.ip(),
            self.admin.port(),
            self.user
        );
        let password = match self.password {
            Some(_) => "PGPASSWORD=<its admin password> ",
            None => "",
        };
        format!(
            "{password}psql {} -c {}",
            shell_quote(&login),
            shell_quote(&self.command("RESUME"))
        )
    }
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// PgBouncer's answers to a `RESUME` of something that is not paused (1.18).
fn not_paused(message: &str) -> bool {
    message.contains("is not paused") || message.contains("not paused/suspended")
}

/// A name for the admin console: PgBouncer takes a bare word; quote anything else.
fn quote_ident(name: &str) -> String {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bouncer(db: Option<&str>) -> PgBouncer {
        PgBouncer {
            admin: "127.0.0.1:1".parse().unwrap(),
            user: "pgbouncer".into(),
            password: None,
            database: db.map(str::to_owned),
            pause_deadline: Duration::from_secs(1),
        }
    }

    #[test]
    fn commands_name_the_database_when_one_is_configured() {
        assert_eq!(bouncer(None).command("PAUSE"), "PAUSE");
        assert_eq!(bouncer(Some("app")).command("RESUME"), "RESUME app");
        assert_eq!(
            bouncer(Some("my\"db")).command("PAUSE"),
            "PAUSE \"my\"\"db\"",
            "a name that is not a plain word is quoted"
        );
    }

    #[test]
    fn an_unreachable_front_says_so_and_what_to_fix() {
        let e = bouncer(None)
            .check("10.0.0.10:5432".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, FrontError::Unreachable { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("pgbouncer at 127.0.0.1:1 cannot be reached; start it or fix"),
            "{e}"
        );
        assert!(
            bouncer(None).resume().is_err(),
            "not reachable is not 'not paused'"
        );
    }

    #[test]
    fn the_resume_command_names_the_console_and_the_database() {
        assert_eq!(
            bouncer(None).resume_command(),
            "psql 'host=127.0.0.1 port=1 user=pgbouncer dbname=pgbouncer' -c 'RESUME'"
        );
        let mut b = bouncer(Some("it's"));
        b.password = Some("secret".into());
        let cmd = b.resume_command();
        assert_eq!(
            cmd,
            "PGPASSWORD=<its admin password> psql 'host=127.0.0.1 port=1 user=pgbouncer dbname=pgbouncer' -c 'RESUME \"it'\\''s\"'",
            "quoted for the shell, the password not shown"
        );
    }

    #[test]
    fn the_not_paused_answers_of_pgbouncer_are_recognised() {
        assert!(not_paused("pooler is not paused/suspended"));
        assert!(not_paused("database app is not paused"));
        assert!(!not_paused("no such database: app"));
    }
}
