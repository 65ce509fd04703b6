//! `[service.front]`: a connection front patchover drives in the switch window
//! (docs/postgres.md). A database's clients keep their sessions on a pooler in transaction
//! mode (PgBouncer); patchover pauses it before the application disk's final cut and resumes
//! it after the switch, so no transaction runs on either server while the service moves.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// Which front it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontKind {
    /// PgBouncer 1.18 or later, through its admin console (`PAUSE`, `RECONNECT`, `RESUME`).
    PgBouncer,
}

/// The validated `[service.front]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontSettings {
    pub kind: FrontKind,
    /// Its listen address as the host reaches it (the admin console is a database there).
    pub admin: SocketAddr,
    /// A name in its `admin_users`.
    pub user: String,
    /// For md5 or cleartext auth; none for `auth_type = trust`.
    pub password: Option<String>,
    /// Pause only this database; every database when unset.
    pub database: Option<String>,
    /// How long `PAUSE` waits for the running transactions before the switch rolls back.
    pub pause_deadline: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFront {
    kind: Spanned<String>,
    admin: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password: Option<String>,
    database: Option<Spanned<String>>,
    pause_deadline_secs: Option<Spanned<u64>>,
}

impl Validator<'_> {
    pub(super) fn front(&self, raw: Spanned<RawFront>) -> Result<FrontSettings, ConfigError> {
        let f = raw.get_ref();
        if f.kind.get_ref() != "pgbouncer" {
            return Err(self.err(
                &f.kind,
                "service.front.kind",
                format!(
                    "{:?} is not a front this patchover drives; write kind = \"pgbouncer\"",
                    f.kind.get_ref()
                ),
            ));
        }
        let Some(admin) = &f.admin else {
            return Err(self.err(
                &raw,
                "service.front.admin",
                "is not set; write PgBouncer's listen address as the host reaches it, e.g. admin = \"127.0.0.1:6432\"",
            ));
        };
        let admin_addr = admin.get_ref().parse::<SocketAddr>().map_err(|_| {
            self.err(
                admin,
                "service.front.admin",
                format!(
                    "{:?} is not ADDRESS:PORT (e.g. \"127.0.0.1:6432\")",
                    admin.get_ref()
                ),
            )
        })?;
        let user = match &f.user {
            Some(u) if word(u.get_ref()) => u.get_ref().clone(),
            Some(u) => {
                return Err(self.err(
                    u,
                    "service.front.user",
                    "needs a user name of letters, digits, '_', '-' or '.'",
                ));
            }
            None => "pgbouncer".to_owned(),
        };
        if let Some(d) = f.database.as_ref().filter(|d| !word(d.get_ref())) {
            return Err(self.err(d, "service.front.database", "needs a database name of letters, digits, '_', '-' or '.'; leave it out to pause every database"));
        }
        let pause_deadline = match &f.pause_deadline_secs {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > 600 => {
                return Err(self.err(
                    p,
                    "service.front.pause_deadline_secs",
                    format!("{} must be 1 to 600", p.get_ref()),
                ));
            }
            Some(p) => Duration::from_secs(*p.get_ref()),
            None => Duration::from_secs(10),
        };
        Ok(FrontSettings {
            kind: FrontKind::PgBouncer,
            admin: admin_addr,
            user,
            password: f.password.clone(),
            database: f.database.as_ref().map(|d| d.get_ref().clone()),
            pause_deadline,
        })
    }
}

fn word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, invalid_section, parse};

    const H: &str = "[service]\nport = 5432\nhealth = { kind = \"http\", path = \"/\" }\n";

    #[test]
    fn a_pgbouncer_front_with_its_defaults_and_in_full() {
        let s = parse(&format!(
            "{GOOD}{H}[service.front]\nkind = \"pgbouncer\"\nadmin = \"127.0.0.1:6432\"\n"
        ))
        .unwrap()
        .service;
        assert_eq!(
            s.front,
            Some(FrontSettings {
                kind: FrontKind::PgBouncer,
                admin: "127.0.0.1:6432".parse().unwrap(),
                user: "pgbouncer".into(),
                password: None,
                database: None,
                pause_deadline: Duration::from_secs(10),
            })
        );
        let s = parse(&format!(
            "{GOOD}{H}front = {{ kind = \"pgbouncer\", admin = \"10.0.0.1:16432\", user = \"ops\", password = \"pw\", database = \"app\", pause_deadline_secs = 3 }}\n"
        ))
        .unwrap()
        .service;
        let f = s.front.unwrap();
        assert_eq!(
            (f.user.as_str(), f.password.as_deref()),
            ("ops", Some("pw"))
        );
        assert_eq!(f.database.as_deref(), Some("app"));
        assert_eq!(f.pause_deadline, Duration::from_secs(3));
        assert_eq!(parse(&format!("{GOOD}{H}")).unwrap().service.front, None);
    }

    #[test]
    fn bad_fronts_are_refused_at_their_line_and_key() {
        let f = "[service.front]\nkind = \"pgbouncer\"\n";
        for (extra, at, want_key, want) in [
            (
                "kind = \"haproxy\"\n",
                5,
                "service.front.kind",
                "\"haproxy\" is not a front",
            ),
            ("", 4, "service.front.admin", "is not set"),
            (
                "admin = \"localhost\"\n",
                6,
                "service.front.admin",
                "is not ADDRESS:PORT",
            ),
            (
                "admin = \"127.0.0.1:1\"\nuser = \"a b\"\n",
                7,
                "service.front.user",
                "needs a user name",
            ),
            (
                "admin = \"127.0.0.1:1\"\ndatabase = \"\"\n",
                7,
                "service.front.database",
                "leave it out",
            ),
            (
                "admin = \"127.0.0.1:1\"\npause_deadline_secs = 0\n",
                7,
                "service.front.pause_deadline_secs",
                "1 to 600",
            ),
        ] {
            let section = if extra.starts_with("kind") {
                format!("{H}[service.front]\n{extra}")
            } else {
                format!("{H}{f}{extra}")
            };
            let (line, key, msg) = invalid_section(&section);
            assert_eq!((line, key.as_str()), (at, want_key), "{section}: {msg}");
            assert!(msg.contains(want), "{section}: {msg}");
        }
        let text = format!("{GOOD}{H}{f}admin = \"127.0.0.1:1\"\nport = 1\n");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("unknown field `port`"), "{err}");
    }
}
