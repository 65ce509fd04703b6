//! The `[service]` section: the contract between patchover and the service the LCs run
//! (`docs/services.md`).
//!
//! patchover knows nothing about a service but what this section says: how to check that it
//! answers, and which commands (hooks) to run in which LC at which moment of a run. There are
//! no defaults that belong to one service: a hook that is not configured is not run, and a
//! patch run refuses to start without a health check. Which LC answered a check is not taken
//! from what the service prints: patchover makes the check's connection from inside the LC's
//! own network namespace (or guest) to one of that LC's own addresses, so only that LC can
//! accept it.

use std::time::Duration;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::front::{FrontSettings, RawFront};
use super::{ConfigError, Validator};

/// The validated `[service]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// The TCP port the service listens on.
    pub port: u16,
    /// How to check the service; `None` when the config has no `[service]` (a patch run then
    /// refuses to start).
    pub health: Option<HealthProbe>,
    /// A GET path whose 200 answer is the service's version, recorded in the run's report
    /// (`version_before`, `version_after`); not read when unset.
    pub version_path: Option<String>,
    /// Moment: in the switch window, after the application disk's final cut is attached to
    /// the standby. Target: the standby. Runs once per switch; must (re)start the service so it
    /// reads the data as of the cut. Empty: not run.
    pub restart: Vec<String>,
    /// Moment: at the switch, before the address moves. Target: the old LC. Stop keeping
    /// connections alive, keep serving. Run again on a retried switch: must be idempotent.
    /// Empty: not run.
    pub drain: Vec<String>,
    /// Moment: when a switch is undone (target: the LC that was drained), by recovery, and
    /// before a switch back's check (`net back`: the LC the earlier switch drained). Never on a
    /// standby that was never drained (the patch cycle's, freshly booted), so a `resume` that
    /// fails where the service already runs (a plain `nginx`) is fine. Undoes `drain`; must
    /// succeed on a drained service. Empty: not run.
    pub resume: Vec<String>,
    /// `seamless` hand-off. Moment: the switch window. Target: the old LC. Finish the requests
    /// in flight, hold the rest; exits 0 only once nothing is in flight. Empty: a seamless
    /// switch with hand-off is refused.
    pub park: Vec<String>,
    /// Moment: after `park` and the standby's check. Target: the old LC. Send the held and later
    /// requests to the standby; `{to}` is replaced by the standby's `ADDR:PORT`. Retried once:
    /// must be idempotent.
    pub forward: Vec<String>,
    /// Moment: a hand-off called off before `forward`. Target: the old LC. Undoes `park`.
    pub unpark: Vec<String>,
    /// Moment: in the switch window, first in the old LC (before the application disk's final
    /// cut), then in the standby (before the cut is attached there). Stop the service cleanly,
    /// so that its data on the disk is complete (a database's shutdown checkpoint); succeed when
    /// it is not running. The old LC's is undone by `resume` on a rollback. Empty: not run.
    pub stop: Vec<String>,
    /// Moment: in the switch window, in the old LC after `stop` and in the standby after the cut
    /// is attached. Both must exit 0 and print the same: the data the standby starts from is
    /// the data the old service left (e.g. a database cluster's state and checkpoint). Empty:
    /// not run.
    pub cut_check: Vec<String>,
    /// `[service.front]`: the connection front paused around the switch (docs/postgres.md).
    pub front: Option<FrontSettings>,
    /// `stateless = true`: the service keeps no state on its application disk, so a `seamless`
    /// switch needs no hand-off: the NAT flips, the old LC finishes the connections it accepted
    /// and stops (docs/services.md, "Stateless services"). Checked by each run against the
    /// disk's write history.
    pub stateless: bool,
    /// How long a stateless service's old LC may keep serving the connections it accepted
    /// before it is stopped anyway (`stateless_drain_secs`, default 30 s).
    pub stateless_drain: Duration,
    /// `watch_secs`: how long the service is watched on the new LC after the switch, the old
    /// LC kept booted with its application disk following, before the old LC is stopped; a
    /// failed check hands the service back (docs/patch-cycle.md, "The watch"). Zero (the
    /// default): no watch, the old LC stops at once.
    pub watch: Duration,
    /// `watch_interval_ms`: how often the watch checks (default 500 ms); also how long one
    /// check may keep failing before it fails.
    pub watch_interval: Duration,
}

/// How patchover checks that the service answers on an LC. Every kind is made from inside the
/// LC (see the module's doc), so which LC answered is known without asking the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// `kind = "http"`: a plain HTTP/1.1 GET of `path` on the service's port, made from inside
    /// the LC to its own address; passes on `status` with `body` (when set) in the body.
    /// `kind = "https"`: the same over TLS (`tls`).
    Http {
        path: String,
        status: u16,
        body: Option<String>,
        /// How long a check may keep failing before it fails for good.
        patience: Duration,
        /// `Some` for `kind = "https"`: whom the check trusts.
        tls: Option<TlsTrust>,
    },
    /// `kind = "tcp"`: a TCP connect to the service's port, made from inside the LC to its own
    /// address; passes when the connection is accepted.
    Tcp { patience: Duration },
    /// `kind = "command"`: `argv` run inside the LC by its backend (an `ns` LC's namespaces and
    /// cgroups, a VM through its agent); passes on exit 0 (e.g. `pg_isready`).
    Command {
        argv: Vec<String>,
        patience: Duration,
    },
}

/// Whom an `https` check trusts: the CA certificates of a file on the host (from the config,
/// never from the LC), or, with `insecure`, any certificate; and the name it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsTrust {
    /// A PEM file of CA certificates on the host; `None` with `insecure`.
    pub ca_file: Option<PathBuf>,
    /// Any certificate is accepted (e.g. a self-signed one).
    pub insecure: bool,
    /// The server name sent (SNI) and verified; `None`: the address checked (an IP SAN).
    pub sni: Option<String>,
}

impl HealthProbe {
    /// How long the check keeps trying.
    pub fn patience(&self) -> Duration {
        match self {
            HealthProbe::Http { patience, .. }
            | HealthProbe::Tcp { patience }
            | HealthProbe::Command { patience, .. } => *patience,
        }
    }
}

impl Default for ServiceSettings {
    /// No `[service]`: the HTTP port, no health check, no hook.
    fn default() -> Self {
        ServiceSettings {
            port: 80,
            health: None,
            version_path: None,
            restart: Vec::new(),
            drain: Vec::new(),
            resume: Vec::new(),
            park: Vec::new(),
            forward: Vec::new(),
            unpark: Vec::new(),
            stop: Vec::new(),
            cut_check: Vec::new(),
            front: None,
            stateless: false,
            stateless_drain: DEFAULT_STATELESS_DRAIN,
            watch: Duration::ZERO,
            watch_interval: DEFAULT_WATCH_INTERVAL,
        }
    }
}

/// How often a watch checks the service when the config does not say.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How long a stateless service's old LC keeps its connections when the config does not say.
pub const DEFAULT_STATELESS_DRAIN: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    port: Option<u16>,
    health: Option<Spanned<RawHealth>>,
    version_path: Option<Spanned<String>>,
    restart: Option<Spanned<Vec<String>>>,
    drain: Option<Spanned<Vec<String>>>,
    resume: Option<Spanned<Vec<String>>>,
    park: Option<Spanned<Vec<String>>>,
    forward: Option<Spanned<Vec<String>>>,
    unpark: Option<Spanned<Vec<String>>>,
    stop: Option<Spanned<Vec<String>>>,
    cut_check: Option<Spanned<Vec<String>>>,
    front: Option<Spanned<RawFront>>,
    stateless: Option<bool>,
    stateless_drain_secs: Option<Spanned<u64>>,
    watch_secs: Option<Spanned<u64>>,
    watch_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    status: Option<Spanned<u16>>,
    body: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    insecure: Option<Spanned<bool>>,
    ca_file: Option<Spanned<PathBuf>>,
    sni: Option<Spanned<String>>,
    patience_secs: Option<Spanned<u64>>,
}

impl Validator<'_> {
    pub(super) fn service(
        &self,
        raw: Option<Spanned<RawService>>,
    ) -> Result<ServiceSettings, ConfigError> {
        let Some(raw) = raw else {
            return Ok(ServiceSettings::default());
        };
        let at = raw.span();
        let raw = raw.into_inner();
        let Some(health) = raw.health else {
            return Err(ConfigError::Invalid {
                path: self.path.to_owned(),
                line: super::line_col(self.text, at.start).0,
                key: "service.health".to_owned(),
                message: "is not set; say how to check the service, e.g. health = { kind = \"http\", path = \"/\" } (see docs/services.md)".to_owned(),
            });
        };
        let health = self.health(health)?;
        if let Some(p) = &raw.version_path {
            self.get_path(p, "service.version_path")?;
        }
        let park = self.hook(raw.park, "service.park")?;
        let forward = self.hook(raw.forward, "service.forward")?;
        let unpark = self.hook(raw.unpark, "service.unpark")?;
        let handoff = [&park, &forward, &unpark];
        if handoff.iter().any(|h| h.is_some()) && handoff.iter().any(|h| h.is_none()) {
            let set = handoff.iter().find_map(|h| h.as_ref()).expect("one is set");
            return Err(self.err(
                set,
                "service.park",
                "the hand-off needs all three of park, forward and unpark, or none",
            ));
        }
        let stateless = raw.stateless.unwrap_or(false);
        let stateless_drain = self.stateless_drain(stateless, raw.stateless_drain_secs)?;
        let (watch, watch_interval) = self.watch(raw.watch_secs, raw.watch_interval_ms)?;
        let plain =
            |h: Option<Spanned<Vec<String>>>| h.map(Spanned::into_inner).unwrap_or_default();
        Ok(ServiceSettings {
            port: raw.port.unwrap_or(80),
            health: Some(health),
            version_path: raw.version_path.map(Spanned::into_inner),
            restart: plain(self.hook(raw.restart, "service.restart")?),
            drain: plain(self.hook(raw.drain, "service.drain")?),
            resume: plain(self.hook(raw.resume, "service.resume")?),
            park: plain(park),
            forward: plain(forward),
            unpark: plain(unpark),
            stop: plain(self.hook(raw.stop, "service.stop")?),
            cut_check: plain(self.hook(raw.cut_check, "service.cut_check")?),
            front: raw.front.map(|f| self.front(f)).transpose()?,
            stateless,
            stateless_drain,
            watch,
            watch_interval,
        })
    }

    /// `watch_secs` (0 to 3600; 0 = no watch) and `watch_interval_ms` (50 to 60000, only with
    /// a watch): a watch must be long enough for one check.
    fn watch(
        &self,
        secs: Option<Spanned<u64>>,
        interval: Option<Spanned<u64>>,
    ) -> Result<(Duration, Duration), ConfigError> {
        let watch = match &secs {
            Some(s) if *s.get_ref() > 3600 => {
                return Err(self.err(
                    s,
                    "service.watch_secs",
                    format!("{} must be 0 (no watch) to 3600", s.get_ref()),
                ));
            }
            Some(s) => Duration::from_secs(*s.get_ref()),
            None => Duration::ZERO,
        };
        let every = match &interval {
            None => DEFAULT_WATCH_INTERVAL,
            Some(i) if watch.is_zero() => {
                return Err(self.err(
                    i,
                    "service.watch_interval_ms",
                    "only applies to a watch; set watch_secs (e.g. 60) or leave it out",
                ));
            }
            Some(i) if !(50..=60_000).contains(i.get_ref()) => {
                return Err(self.err(
                    i,
                    "service.watch_interval_ms",
                    format!("{} must be 50 to 60000", i.get_ref()),
                ));
            }
            Some(i) => Duration::from_millis(*i.get_ref()),
        };
        if let Some(s) = secs.as_ref().filter(|_| !watch.is_zero() && watch < every) {
            return Err(self.err(
                s,
                "service.watch_secs",
                format!(
                    "{} s is shorter than one check ({} ms, watch_interval_ms); watch longer or check more often",
                    s.get_ref(),
                    every.as_millis()
                ),
            ));
        }
        Ok((watch, every))
    }

    /// `stateless_drain_secs`: 1–3600, and only with `stateless = true`.
    fn stateless_drain(
        &self,
        stateless: bool,
        raw: Option<Spanned<u64>>,
    ) -> Result<Duration, ConfigError> {
        let key = "service.stateless_drain_secs";
        match raw {
            None => Ok(DEFAULT_STATELESS_DRAIN),
            Some(s) if !stateless => Err(self.err(
                &s,
                key,
                "only applies to a stateless service; set stateless = true or leave it out",
            )),
            Some(s) if *s.get_ref() == 0 || *s.get_ref() > 3600 => {
                Err(self.err(&s, key, format!("{} must be 1 to 3600", s.get_ref())))
            }
            Some(s) => Ok(Duration::from_secs(*s.get_ref())),
        }
    }

    fn health(&self, raw: Spanned<RawHealth>) -> Result<HealthProbe, ConfigError> {
        let h = raw.get_ref();
        let patience = self.patience(h)?;
        let kind = h.kind.get_ref().as_str();
        // The keys each kind reads; any other key set is a mistake, refused at its line.
        let reads: &[&str] = match kind {
            "http" => &["path", "status", "body"],
            "https" => &["path", "status", "body", "insecure", "ca_file", "sni"],
            "tcp" => &[],
            "command" => &["command"],
            _ => {
                return Err(self.err(
                    &h.kind,
                    "service.health.kind",
                    format!(
                        "{kind:?} is not a kind of check this patchover runs; write kind = \"http\", \"https\", \"tcp\" or \"command\""
                    ),
                ));
            }
        };
        self.only_keys_of(h, kind, reads)?;
        Ok(match kind {
            "http" => self.http(&raw, patience, None)?,
            "https" => self.http(&raw, patience, Some(self.tls(&raw)?))?,
            "tcp" => HealthProbe::Tcp { patience },
            _ => HealthProbe::Command {
                argv: self.health_command(&raw)?,
                patience,
            },
        })
    }

    /// Refuses, at its line, a key of the health check that `kind` does not read.
    fn only_keys_of(&self, h: &RawHealth, kind: &str, reads: &[&str]) -> Result<(), ConfigError> {
        let set = [
            ("path", h.path.as_ref().map(Spanned::span)),
            ("status", h.status.as_ref().map(Spanned::span)),
            ("body", h.body.as_ref().map(Spanned::span)),
            ("command", h.command.as_ref().map(Spanned::span)),
            ("insecure", h.insecure.as_ref().map(Spanned::span)),
            ("ca_file", h.ca_file.as_ref().map(Spanned::span)),
            ("sni", h.sni.as_ref().map(Spanned::span)),
        ];
        for (key, span) in set {
            if let Some(span) = span.filter(|_| !reads.contains(&key)) {
                return Err(ConfigError::Invalid {
                    path: self.path.to_owned(),
                    line: super::line_col(self.text, span.start).0,
                    key: format!("service.health.{key}"),
                    message: format!(
                        "kind = {kind:?} reads no {key}; remove it or change the kind"
                    ),
                });
            }
        }
        Ok(())
    }

    fn patience(&self, h: &RawHealth) -> Result<Duration, ConfigError> {
        match &h.patience_secs {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > 3600 => Err(self.err(
                p,
                "service.health.patience_secs",
                format!("{} must be 1 to 3600", p.get_ref()),
            )),
            Some(p) => Ok(Duration::from_secs(*p.get_ref())),
            None => Ok(Duration::from_secs(2)),
        }
    }

    fn http(
        &self,
        raw: &Spanned<RawHealth>,
        patience: Duration,
        tls: Option<TlsTrust>,
    ) -> Result<HealthProbe, ConfigError> {
        let h = raw.get_ref();
        let Some(path) = &h.path else {
            return Err(self.err(
                raw,
                "service.health.path",
                "an http check needs the path to GET, e.g. path = \"/\"",
            ));
        };
        self.get_path(path, "service.health.path")?;
        let status = match &h.status {
            Some(s) if !(100..=599).contains(s.get_ref()) => {
                return Err(self.err(
                    s,
                    "service.health.status",
                    format!("{} is not an HTTP status (100 to 599)", s.get_ref()),
                ));
            }
            Some(s) => *s.get_ref(),
            None => 200,
        };
        Ok(HealthProbe::Http {
            path: path.get_ref().clone(),
            status,
            body: h.body.as_ref().map(|b| b.get_ref().clone()),
            patience,
            tls,
        })
    }

    /// An `https` check's trust: a CA file on the host (absolute, with a PEM certificate in
    /// it) or `insecure = true`, exactly one; `sni` a DNS name.
    fn tls(&self, raw: &Spanned<RawHealth>) -> Result<TlsTrust, ConfigError> {
        let h = raw.get_ref();
        let insecure = h.insecure.as_ref().is_some_and(|i| *i.get_ref());
        match (&h.ca_file, &h.insecure) {
            (None, _) if !insecure => {
                return Err(self.err(
                    raw,
                    "service.health.ca_file",
                    "an https check needs to know whom to trust: ca_file = \"/etc/patchover/service-ca.pem\" (a PEM file on the host) or insecure = true (any certificate)",
                ));
            }
            (Some(_), Some(i)) if insecure => {
                return Err(self.err(
                    i,
                    "service.health.insecure",
                    "insecure = true trusts any certificate, so ca_file would not be used; keep one of them",
                ));
            }
            _ => {}
        }
        if let Some(ca) = &h.ca_file {
            self.ca_file(ca)?;
        }
        if let Some(sni) = &h.sni {
            let s = sni.get_ref();
            let ok = !s.is_empty()
                && s.len() <= 253
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(self.err(
                    sni,
                    "service.health.sni",
                    format!("{s:?} is not a DNS name (letters, digits, '-' and dots)"),
                ));
            }
        }
        Ok(TlsTrust {
            ca_file: h.ca_file.as_ref().map(|c| c.get_ref().clone()),
            insecure,
            sni: h.sni.as_ref().map(|s| s.get_ref().clone()),
        })
    }

    /// A CA file on the host: absolute, readable, with a PEM certificate in it.
    fn ca_file(&self, ca: &Spanned<PathBuf>) -> Result<(), ConfigError> {
        let key = "service.health.ca_file";
        let path = ca.get_ref();
        if !path.is_absolute() {
            return Err(self.err(ca, key, "use an absolute path on the host"));
        }
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => Ok(()),
            Ok(_) => Err(self.err(
                ca,
                key,
                format!(
                    "{} has no PEM certificate (-----BEGIN CERTIFICATE-----); point ca_file at the CA's certificate",
                    path.display()
                ),
            )),
            Err(e) => Err(self.err(
                ca,
                key,
                format!("cannot read {}: {e}; make it a readable file", path.display()),
            )),
        }
    }

    /// The program of a `command` check: required, with a program.
    fn health_command(&self, raw: &Spanned<RawHealth>) -> Result<Vec<String>, ConfigError> {
        let key = "service.health.command";
        match &raw.get_ref().command {
            None => Err(self.err(
                raw,
                key,
                "a command check needs the program to run in the LC, e.g. command = [\"pg_isready\", \"-h\", \"127.0.0.1\"]",
            )),
            Some(c) if no_program(c.get_ref()) => Err(self.err(
                c,
                key,
                "needs a program, e.g. command = [\"pg_isready\", \"-h\", \"127.0.0.1\"]",
            )),
            Some(c) => Ok(c.get_ref().clone()),
        }
    }

    fn get_path(&self, p: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
        let s = p.get_ref();
        if s.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Ok(())
        } else {
            Err(self.err(
                p,
                key,
                format!(
                    "{s:?} is not a request path; write one that starts with '/' and has no spaces"
                ),
            ))
        }
    }

    /// A hook's command: absent is "not run"; present needs a program.
    fn hook(
        &self,
        raw: Option<Spanned<Vec<String>>>,
        key: &str,
    ) -> Result<Option<Spanned<Vec<String>>>, ConfigError> {
        match &raw {
            Some(h) if no_program(h.get_ref()) => Err(self.err(
                h,
                key,
                "needs a command (e.g. [\"/etc/init.d/S50app\", \"restart\"]); leave the key out to run nothing",
            )),
            _ => Ok(raw),
        }
    }
}

/// A command without a program to run (`[]`, `[""]`).
fn no_program(argv: &[String]) -> bool {
    argv.first().is_none_or(|p| p.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, invalid_section, parse};

    fn service(section: &str) -> ServiceSettings {
        parse(&format!("{GOOD}{section}")).unwrap().service
    }

    #[test]
    fn no_service_section_means_no_check_and_no_hook() {
        let s = parse(GOOD).unwrap().service;
        assert_eq!(s.health, None);
        assert!(s.restart.is_empty() && s.drain.is_empty() && s.resume.is_empty());
        assert!(s.park.is_empty() && s.forward.is_empty() && s.unpark.is_empty());
        assert_eq!(s.version_path, None);
    }

    #[test]
    fn an_http_check_with_its_defaults_and_in_full() {
        let s = service("[service]\nhealth = { kind = \"http\", path = \"/\" }\n");
        assert_eq!(
            s.health,
            Some(HealthProbe::Http {
                path: "/".into(),
                status: 200,
                body: None,
                patience: Duration::from_secs(2),
                tls: None,
            })
        );
        assert_eq!(s.port, 80);
        assert!(s.restart.is_empty(), "a hook not configured is not run");

        let s = service(
            "[service]\nport = 8080\nversion_path = \"/v\"\ndrain = [\"/bin/true\"]\n[service.health]\nkind = \"http\"\npath = \"/ready\"\nstatus = 204\nbody = \"up\"\npatience_secs = 30\n",
        );
        assert_eq!(
            s.health,
            Some(HealthProbe::Http {
                path: "/ready".into(),
                status: 204,
                body: Some("up".into()),
                patience: Duration::from_secs(30),
                tls: None,
            })
        );
        assert_eq!(s.health.unwrap().patience(), Duration::from_secs(30));
        assert_eq!((s.port, s.version_path.as_deref()), (8080, Some("/v")));
        assert_eq!(s.drain, ["/bin/true"]);
        assert!(s.resume.is_empty());
    }

    #[test]
    fn tcp_and_command_checks() {
        let s = service("[service]\nport = 5432\nhealth = { kind = \"tcp\", patience_secs = 5 }\n");
        assert_eq!(
            s.health,
            Some(HealthProbe::Tcp {
                patience: Duration::from_secs(5)
            })
        );
        let s = service(
            "[service.health]\nkind = \"command\"\ncommand = [\"pg_isready\", \"-h\", \"127.0.0.1\"]\n",
        );
        let want = HealthProbe::Command {
            argv: vec!["pg_isready".into(), "-h".into(), "127.0.0.1".into()],
            patience: Duration::from_secs(2),
        };
        assert_eq!(s.health.as_ref(), Some(&want));
        assert_eq!(want.patience(), Duration::from_secs(2));
    }

    #[test]
    fn keys_a_kind_does_not_read_and_commands_without_a_program_are_refused() {
        for (section, at, want_key, want) in [
            (
                "[service.health]\nkind = \"command\"\n",
                1,
                "service.health.command",
                "needs the program to run in the LC",
            ),
            (
                "[service.health]\nkind = \"command\"\ncommand = []\n",
                3,
                "service.health.command",
                "needs a program",
            ),
            (
                "[service.health]\nkind = \"command\"\ncommand = [\" \", \"x\"]\n",
                3,
                "service.health.command",
                "needs a program",
            ),
            (
                "[service.health]\nkind = \"tcp\"\npath = \"/\"\n",
                3,
                "service.health.path",
                "kind = \"tcp\" reads no path",
            ),
            (
                "[service.health]\nkind = \"tcp\"\nbody = \"ok\"\n",
                3,
                "service.health.body",
                "reads no body",
            ),
            (
                "[service.health]\nkind = \"http\"\npath = \"/\"\ncommand = [\"true\"]\n",
                4,
                "service.health.command",
                "kind = \"http\" reads no command",
            ),
            (
                "[service.health]\nkind = \"command\"\ncommand = [\"true\"]\nstatus = 200\n",
                4,
                "service.health.status",
                "reads no status",
            ),
        ] {
            let (line, key, msg) = invalid_section(section);
            assert_eq!((line, key.as_str()), (at, want_key), "{section}: {msg}");
            assert!(msg.contains(want), "{section}: {msg}");
        }
    }

    #[test]
    fn https_checks_trust_a_ca_file_or_nothing() {
        let s = service(
            "[service.health]\nkind = \"https\"\npath = \"/\"\ninsecure = true\nsni = \"svc.example\"\n",
        );
        let Some(HealthProbe::Http { tls: Some(tls), .. }) = &s.health else {
            panic!("{:?}", s.health);
        };
        let want = TlsTrust {
            ca_file: None,
            insecure: true,
            sni: Some("svc.example".into()),
        };
        assert_eq!(tls, &want);
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let s = service(&format!(
            "[service.health]\nkind = \"https\"\npath = \"/h\"\nca_file = {:?}\n",
            ca.display().to_string()
        ));
        let Some(HealthProbe::Http {
            path,
            tls: Some(tls),
            ..
        }) = &s.health
        else {
            panic!("{:?}", s.health);
        };
        assert_eq!(
            (path.as_str(), tls.ca_file.as_deref(), tls.insecure),
            ("/h", Some(&*ca), false)
        );

        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let h = "[service.health]\nkind = \"https\"\npath = \"/\"\n";
        for (section, at, want_key, want) in [
            (
                h.to_owned(),
                1,
                "service.health.ca_file",
                "needs to know whom to trust",
            ),
            (
                format!("{h}insecure = false\n"),
                1,
                "service.health.ca_file",
                "or insecure = true",
            ),
            (
                format!(
                    "{h}insecure = true\nca_file = {:?}\n",
                    ca.display().to_string()
                ),
                4,
                "service.health.insecure",
                "keep one of them",
            ),
            (
                format!("{h}ca_file = \"ca.pem\"\n"),
                4,
                "service.health.ca_file",
                "absolute path",
            ),
            (
                format!("{h}ca_file = {:?}\n", key.display().to_string()),
                4,
                "service.health.ca_file",
                "has no PEM certificate",
            ),
            (
                format!("{h}ca_file = \"/nonexistent/po-ca.pem\"\n"),
                4,
                "service.health.ca_file",
                "cannot read /nonexistent/po-ca.pem",
            ),
            (
                format!("{h}insecure = true\nsni = \"a b\"\n"),
                5,
                "service.health.sni",
                "not a DNS name",
            ),
            (
                "[service.health]\nkind = \"http\"\npath = \"/\"\ninsecure = true\n".to_owned(),
                4,
                "service.health.insecure",
                "kind = \"http\" reads no insecure",
            ),
        ] {
            let (line, key, msg) = invalid_section(&section);
            assert_eq!((line, key.as_str()), (at, want_key), "{section}: {msg}");
            assert!(msg.contains(want), "{section}: {msg}");
        }
    }

    #[test]
    fn bad_service_sections_are_refused_at_their_line_and_key() {
        let h = "health = { kind = \"http\", path = \"/\" }\n";
        for (section, at, want_key, want) in [
            ("[service]\nport = 80\n", 1, "service.health", "is not set"),
            (
                "[service]\nhealth = { kind = \"smtp\", path = \"/\" }\n",
                2,
                "service.health.kind",
                "\"smtp\" is not a kind",
            ),
            (
                "[service]\n[service.health]\nkind = \"http\"\n",
                2,
                "service.health.path",
                "needs the path",
            ),
            (
                "[service]\n[service.health]\nkind = \"http\"\npath = \"health\"\n",
                4,
                "service.health.path",
                "starts with '/'",
            ),
            (
                "[service.health]\nkind = \"http\"\npath = \"/\"\nstatus = 999\n",
                4,
                "service.health.status",
                "not an HTTP status",
            ),
            (
                "[service.health]\nkind = \"http\"\npath = \"/\"\npatience_secs = 0\n",
                4,
                "service.health.patience_secs",
                "1 to 3600",
            ),
            (
                &format!("[service]\n{h}restart = []\n"),
                3,
                "service.restart",
                "needs a command",
            ),
            (
                &format!("[service]\n{h}drain = [\"\"]\n"),
                3,
                "service.drain",
                "leave the key out",
            ),
            (
                &format!("[service]\n{h}park = [\"/bin/park\"]\n"),
                3,
                "service.park",
                "all three of park, forward and unpark",
            ),
            (
                &format!("[service]\n{h}version_path = \"v\"\n"),
                3,
                "service.version_path",
                "not a request path",
            ),
        ] {
            let (line, key, msg) = invalid_section(section);
            assert_eq!((line, key.as_str()), (at, want_key), "{section}: {msg}");
            assert!(msg.contains(want), "{section}: {msg}");
        }
    }

    #[test]
    fn stateless_is_typed_and_its_drain_deadline_checked() {
        let h = "health = { kind = \"http\", path = \"/\" }\n";
        let s = service(&format!("[service]\n{h}"));
        assert!(!s.stateless, "a service is not stateless unless it says so");
        assert_eq!(s.stateless_drain, DEFAULT_STATELESS_DRAIN);
        let s = service(&format!(
            "[service]\n{h}stateless = true\nstateless_drain_secs = 5\n"
        ));
        assert!(s.stateless);
        assert_eq!(s.stateless_drain, Duration::from_secs(5));
        for (section, want) in [
            (
                format!("[service]\n{h}stateless_drain_secs = 5\n"),
                "only applies to a stateless service",
            ),
            (
                format!("[service]\n{h}stateless = true\nstateless_drain_secs = 0\n"),
                "1 to 3600",
            ),
        ] {
            let (line, key, msg) = invalid_section(&section);
            let at = section.lines().count();
            assert_eq!(
                (line, key.as_str()),
                (at, "service.stateless_drain_secs"),
                "{msg}"
            );
            assert!(msg.contains(want), "{section}: {msg}");
        }
        let text = format!("{GOOD}[service]\n{h}stateless = \"yes\"\n");
        let err = parse(&text).unwrap_err().to_string();
        let at = text.lines().count();
        assert!(err.starts_with(&format!("/etc/po.toml:{at}:")), "{err}");
        assert!(err.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn the_watch_is_off_by_default_typed_and_refused_shorter_than_one_check() {
        let h = "health = { kind = \"http\", path = \"/\" }\n";
        let s = service(&format!("[service]\n{h}"));
        assert_eq!(s.watch, Duration::ZERO, "no watch unless the config asks");
        assert_eq!(s.watch_interval, DEFAULT_WATCH_INTERVAL);
        let s = service(&format!(
            "[service]\n{h}watch_secs = 20\nwatch_interval_ms = 250\n"
        ));
        assert_eq!(
            (s.watch, s.watch_interval),
            (Duration::from_secs(20), Duration::from_millis(250))
        );
        for (section, key, want) in [
            (
                format!("[service]\n{h}watch_interval_ms = 2000\nwatch_secs = 1\n"),
                "service.watch_secs",
                "1 s is shorter than one check (2000 ms, watch_interval_ms)",
            ),
            (
                format!("[service]\n{h}watch_secs = 3601\n"),
                "service.watch_secs",
                "0 (no watch) to 3600",
            ),
            (
                format!("[service]\n{h}watch_interval_ms = 100\n"),
                "service.watch_interval_ms",
                "only applies to a watch",
            ),
            (
                format!("[service]\n{h}watch_secs = 5\nwatch_interval_ms = 10\n"),
                "service.watch_interval_ms",
                "50 to 60000",
            ),
        ] {
            let (line, got, msg) = invalid_section(&section);
            assert_eq!(
                (line, got.as_str()),
                (section.lines().count(), key),
                "{msg}"
            );
            assert!(msg.contains(want), "{section}: {msg}");
        }
    }

    #[test]
    fn unknown_keys_of_the_health_check_are_refused() {
        let text =
            format!("{GOOD}[service.health]\nkind = \"http\"\npath = \"/\"\nexpect = \"x\"\n");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("unknown field `expect`"), "{err}");
        // At the key's own line.
        let at = text.lines().position(|l| l.starts_with("expect")).unwrap() + 1;
        assert!(
            err.to_string().starts_with(&format!("/etc/po.toml:{at}:")),
            "{err}"
        );
    }
}
