//! The service the LCs run: how to check it and how to restart it on the standby.

use std::time::{Duration, Instant};

/// The `[service]` config section, typed and checked by the config loader.
pub use patchover_core::ServiceSettings;

/// The health check of the service that `settings` describe (`[service] health`). Which LC
/// answered is proven by where the check is made (`patchover_net::health::check_own`), not by
/// the answer's text.
pub fn health(
    settings: &ServiceSettings,
) -> Result<patchover_net::HealthCheck, crate::OrchestratorError> {
    use patchover_core::HealthProbe;
    use patchover_net::Probe;
    let Some(configured) = &settings.health else {
        return Err(crate::OrchestratorError::BadInput(
            "the config says no way to check the service; set [service] health, e.g. health = { kind = \"http\", path = \"/\" } (docs/services.md)".into(),
        ));
    };
    let (probe, path, status, body) = match configured {
        HealthProbe::Http {
            path,
            status,
            body,
            tls,
            ..
        } => (
            tls.clone().map_or(Probe::Http, Probe::Https),
            &path[..],
            *status,
            body.as_deref(),
        ),
        HealthProbe::Tcp { .. } => (Probe::Tcp, "", 200, None),
        HealthProbe::Command { argv, .. } => (Probe::Command { argv: argv.clone() }, "", 200, None),
    };
    Ok(patchover_net::HealthCheck {
        probe,
        status,
        patience: configured.patience(),
        ..patchover_net::HealthCheck::new(settings.port, path, body.unwrap_or_default())
    })
}

/// Runs a `command` check's program in one LC by its backend ([`patchover_lc::LcBackend::exec`]:
/// an `ns` LC's namespaces and cgroups, a VM through its agent), killed at the check's time.
pub struct RunByBackend<'a> {
    pub backend: &'a dyn patchover_lc::LcBackend,
    pub spec: &'a patchover_core::LcSpec,
}

impl patchover_net::health::RunInLc for RunByBackend<'_> {
    fn run(
        &self,
        argv: &[String],
        timeout: Duration,
    ) -> Result<patchover_net::lc::GuestOutput, patchover_net::BoxError> {
        let start = Instant::now();
        let out = self
            .backend
            .exec(self.spec, argv, patchover_lc::Stdio::CaptureFor(timeout))?;
        Ok(patchover_net::lc::GuestOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: out.status.is_none() && start.elapsed() >= timeout,
        })
    }
}

/// The hooks a run in `mode` may run (all but the hand-off's outside `seamless`; a stateless
/// service's `seamless` switch runs none but `restart` and `resume`), and a `command` health
/// check's program.
fn hooks_of(
    settings: &ServiceSettings,
    mode: patchover_net::Mode,
) -> Vec<(&'static str, &[String])> {
    let stateless = crate::stateless::applies(settings, mode);
    let mut hooks = if stateless {
        vec![
            ("restart", &settings.restart[..]),
            ("resume", &settings.resume[..]),
        ]
    } else {
        vec![
            ("restart", &settings.restart[..]),
            ("drain", &settings.drain[..]),
            ("resume", &settings.resume[..]),
            ("stop", &settings.stop[..]),
            ("cut_check", &settings.cut_check[..]),
        ]
    };
    // A command check's program is run in the LC too.
    if let Some(patchover_core::HealthProbe::Command { argv, .. }) = &settings.health {
        hooks.push(("health", &argv[..]));
    }
    if mode == patchover_net::Mode::Seamless && !stateless {
        hooks.extend([
            ("park", &settings.park[..]),
            ("forward", &settings.forward[..]),
            ("unpark", &settings.unpark[..]),
        ]);
    }
    hooks
}

/// The programs of the hooks a run in `mode` may run are in `active` (the standby's system
/// disk is its copy): a missing one is refused before anything changes, not found in the
/// switch window. Asked of the LC's own shell (`command -v`), so a bare name is looked up on
/// the LC's `PATH`.
pub fn hooks_present(
    backend: &dyn patchover_lc::LcBackend,
    active: &patchover_core::LcSpec,
    settings: &ServiceSettings,
    mode: patchover_net::Mode,
) -> Result<(), crate::OrchestratorError> {
    let mut seen = std::collections::BTreeSet::new();
    for (hook, argv) in hooks_of(settings, mode) {
        let Some(program) = argv.first() else {
            continue;
        };
        if !seen.insert(program) {
            continue;
        }
        let ask = [
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            "command -v \"$1\"".to_owned(),
            "sh".to_owned(),
            program.clone(),
        ];
        let out = backend.exec(active, &ask, patchover_lc::Stdio::Capture)?;
        if out.status != Some(0) {
            return Err(crate::OrchestratorError::BadInput(format!(
                "[service] {hook}: {program} is not in LC {} (asked with `command -v`, exit {:?}{}); install it there or fix the hook; nothing was changed",
                active.id,
                out.status,
                match String::from_utf8_lossy(&out.stderr).trim() {
                    "" => String::new(),
                    e => format!(": {e}"),
                },
            )));
        }
    }
    Ok(())
}

/// GETs `path` from `addr:port` inside the LC that `access` reaches (its namespace, or its
/// guest through the agent), retrying until `patience` runs out; returns the trimmed body of a
/// 200 answer.
pub fn get(
    access: &patchover_net::LcAccess,
    addr: std::net::Ipv4Addr,
    port: u16,
    path: &str,
    patience: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let sa = std::net::SocketAddr::from((addr, port));
    let mut lc: Option<Box<dyn patchover_net::InLc>> = None;
    loop {
        let res = match &lc {
            Some(lc) => fetch(&**lc, sa, path),
            None => match access.open() {
                Ok(opened) => {
                    let r = fetch(&*opened, sa, path);
                    lc = Some(opened);
                    r
                }
                Err(e) => Err(crate::chain(&e)),
            },
        };
        match res {
            Ok(body) => return Ok(body),
            Err(e) if start.elapsed() >= patience => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn fetch(
    lc: &dyn patchover_net::InLc,
    sa: std::net::SocketAddr,
    path: &str,
) -> Result<String, String> {
    let a = lc
        .http_get(sa, path, Duration::from_secs(2))
        .map_err(|e| crate::chain(&e))?;
    if a.status() != Some(200) {
        return Err(format!("GET {path}: {}", a.status_line));
    }
    Ok(a.body.trim().to_owned())
}

/// The switcher's [`patchover_net::ServiceControl`]: runs the configured drain and resume
/// commands inside the LC an endpoint names, and pauses and resumes the front with them
/// (`[service.front]`, docs/postgres.md).
pub struct LcServiceControl<'a> {
    pub backend: &'a dyn patchover_lc::LcBackend,
    pub lcs: &'a [patchover_core::LcSpec],
    pub settings: &'a ServiceSettings,
    /// Paused after the drain command, resumed after the resume command.
    pub front: Option<&'a crate::front::Driven<'a>>,
}

impl LcServiceControl<'_> {
    fn spec(
        &self,
        ep: &patchover_net::Endpoint,
    ) -> Result<&patchover_core::LcSpec, patchover_net::BoxError> {
        Ok(self
            .lcs
            .iter()
            .find(|l| l.id.as_str() == ep.name)
            .ok_or_else(|| format!("no LC {}", ep.name))?)
    }

    fn run(
        &self,
        ep: &patchover_net::Endpoint,
        argv: &[String],
    ) -> Result<(), patchover_net::BoxError> {
        if argv.is_empty() {
            return Ok(());
        }
        let spec = self.spec(ep)?;
        let out = self
            .backend
            .exec(spec, argv, patchover_lc::Stdio::Capture)?;
        if out.status != Some(0) {
            return Err(format!(
                "{argv:?} in {} exited with {:?}: {}",
                ep.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(())
    }
}

impl patchover_net::ServiceControl for LcServiceControl<'_> {
    /// The drain command, then the front's pause: its running transactions finish, new ones
    /// wait, and it closes its connections to the old LC (which the switcher then waits for).
    fn drain(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        self.run(ep, &self.settings.drain)?;
        if let Some(front) = self.front {
            let took = front.pause()?;
            tracing::info!(front = %front.describe(), ms = took.as_millis() as u64, "front paused");
        }
        Ok(())
    }
    /// The resume command (a service stopped in the window starts again), then the front's
    /// resume; both are tried, the first failure is returned.
    fn resume(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        let hook = self.run(ep, &self.settings.resume);
        let front = match self.front {
            Some(f) => f.resume_once().map(|_| ()).map_err(Into::into),
            None => Ok(()),
        };
        hook.and(front)
    }
    fn park(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        self.hand_off(ep, "park", &self.settings.park)
    }
    fn forward(
        &mut self,
        ep: &patchover_net::Endpoint,
        to: std::net::SocketAddr,
    ) -> Result<(), patchover_net::BoxError> {
        let argv: Vec<String> = self
            .settings
            .forward
            .iter()
            .map(|a| a.replace("{to}", &to.to_string()))
            .collect();
        self.hand_off(ep, "forward", &argv)
    }
    fn unpark(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        self.hand_off(ep, "unpark", &self.settings.unpark)
    }
    fn run_in(
        &self,
        ep: &patchover_net::Endpoint,
        argv: &[String],
        timeout: Duration,
    ) -> Result<patchover_net::lc::GuestOutput, patchover_net::BoxError> {
        use patchover_net::health::RunInLc;
        let run = RunByBackend {
            backend: self.backend,
            spec: self.spec(ep)?,
        };
        run.run(argv, timeout)
    }
}

impl LcServiceControl<'_> {
    /// A hand-off command must exist: an empty one cannot be "only waited for".
    fn hand_off(
        &self,
        ep: &patchover_net::Endpoint,
        what: &str,
        argv: &[String],
    ) -> Result<(), patchover_net::BoxError> {
        if argv.is_empty() {
            return Err(format!(
                "[service] {what} is empty: seamless mode needs the service's hand-off commands (park, forward, unpark)"
            )
            .into());
        }
        self.run(ep, argv)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use patchover_core::HealthProbe;

    use super::*;

    #[test]
    fn no_health_check_configured_is_bad_input_that_names_the_key() {
        let e = health(&ServiceSettings::default()).unwrap_err();
        assert!(matches!(e, crate::OrchestratorError::BadInput(_)), "{e:?}");
        assert!(e.to_string().contains("[service] health"), "{e}");
    }

    #[test]
    fn a_hook_whose_program_is_missing_is_refused_naming_it() {
        use crate::step::fake::Bed;
        let bed = Bed::new();
        let mut s = bed.settings.service.clone();
        s.drain = vec!["/usr/sbin/drain-it".into()];
        s.park = vec!["/usr/bin/park-it".into()];
        s.forward = s.park.clone();
        s.unpark = s.park.clone();
        let readdress = patchover_net::Mode::Readdress;
        hooks_present(&bed.backend, &bed.run.active, &s, readdress).unwrap();
        let asked: Vec<String> = bed
            .backend
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("exec lc1"))
            .collect();
        assert_eq!(
            asked,
            [
                "exec lc1 /bin/sh -c command -v \"$1\" sh /etc/init.d/S50demo",
                "exec lc1 /bin/sh -c command -v \"$1\" sh /usr/sbin/drain-it",
            ],
            "the hand-off's hooks are not asked for outside seamless"
        );
        bed.backend.exec_status(127, b"");
        let e = hooks_present(&bed.backend, &bed.run.active, &s, readdress).unwrap_err();
        assert!(matches!(e, crate::OrchestratorError::BadInput(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("[service] restart: /etc/init.d/S50demo is not in LC lc1"),
            "{e}"
        );
    }

    #[test]
    fn a_command_checks_program_is_asked_for_like_a_hooks_and_becomes_the_probe() {
        use crate::step::fake::Bed;
        let bed = Bed::new();
        let mut s = bed.settings.service.clone();
        s.health = Some(HealthProbe::Command {
            argv: vec!["pg_isready".into(), "-q".into()],
            patience: Duration::from_secs(7),
        });
        hooks_present(
            &bed.backend,
            &bed.run.active,
            &s,
            patchover_net::Mode::Readdress,
        )
        .unwrap();
        let asked = bed.backend.calls();
        assert!(
            asked.contains(&"exec lc1 /bin/sh -c command -v \"$1\" sh pg_isready".to_string()),
            "{asked:?}"
        );
        let hc = health(&s).unwrap();
        assert_eq!(
            hc.probe,
            patchover_net::Probe::Command {
                argv: vec!["pg_isready".into(), "-q".into()]
            }
        );
        assert_eq!((hc.port, hc.patience), (s.port, Duration::from_secs(7)));
        s.health = Some(HealthProbe::Tcp {
            patience: Duration::from_secs(3),
        });
        assert_eq!(health(&s).unwrap().probe, patchover_net::Probe::Tcp);
        bed.backend.exec_status(127, b"");
        s.health = Some(HealthProbe::Command {
            argv: vec!["pg_isready".into()],
            patience: Duration::from_secs(7),
        });
        s.restart.clear();
        s.drain.clear();
        s.resume.clear();
        let e = hooks_present(
            &bed.backend,
            &bed.run.active,
            &s,
            patchover_net::Mode::Readdress,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("[service] health: pg_isready is not in LC lc1"),
            "{e}"
        );
    }

    #[test]
    fn the_front_is_paused_after_the_drain_and_resumed_after_the_resume_command() {
        use crate::front::fake::FakeFront;
        use crate::step::fake::Bed;
        use patchover_net::ServiceControl;
        let bed = Bed::new();
        let mut s = bed.settings.service.clone();
        s.drain = vec!["drain-it".into()];
        s.resume = vec!["start-it".into()];
        let front = FakeFront::default();
        let driven = crate::front::Driven::new(&front, None, false);
        let ep = bed.run.from.clone();
        let mut ctl = LcServiceControl {
            backend: &bed.backend,
            lcs: &bed.config.lcs,
            settings: &s,
            front: Some(&driven),
        };
        ctl.drain(&ep).unwrap();
        assert_eq!(*front.calls.borrow(), ["pause"]);
        assert!(bed.backend.calls().iter().any(|c| c == "exec lc1 drain-it"));
        // A failed resume command still resumes the front; the command's failure is returned.
        bed.backend.exec_status(1, b"cannot start");
        let e = ctl.resume(&ep).unwrap_err();
        assert!(e.to_string().contains("cannot start"), "{e}");
        assert_eq!(*front.calls.borrow(), ["pause", "resume"]);
        assert!(!*front.paused.borrow());
        // A pause that runs out fails the drain (the switch rolls back).
        let slow = FakeFront {
            pause_fails: true,
            ..FakeFront::default()
        };
        let slow = crate::front::Driven::new(&slow, None, false);
        ctl.front = Some(&slow);
        bed.backend.exec_status(0, b"");
        let e = ctl.drain(&ep).unwrap_err();
        assert!(e.to_string().contains("pause deadline"), "{e}");
    }

    #[test]
    fn the_configured_http_check_is_the_one_run() {
        let s = ServiceSettings {
            port: 8080,
            health: Some(HealthProbe::Http {
                path: "/ready".into(),
                status: 204,
                body: Some("up".into()),
                patience: Duration::from_secs(9),
                tls: None,
            }),
            ..ServiceSettings::default()
        };
        let hc = health(&s).unwrap();
        assert_eq!((hc.port, hc.path.as_str()), (8080, "/ready"));
        assert_eq!((hc.status, hc.expect.as_str()), (204, "up"));
        assert_eq!(hc.patience, Duration::from_secs(9));
        // An LC's identity is not text in the body: an empty one keeps the configured body.
        assert_eq!(hc.probe, patchover_net::Probe::Http);
        let trust = patchover_core::TlsTrust {
            ca_file: None,
            insecure: true,
            sni: None,
        };
        let mut s = s;
        if let Some(HealthProbe::Http { tls, .. }) = &mut s.health {
            *tls = Some(trust.clone());
        }
        let hs = health(&s).unwrap();
        assert_eq!(hs.probe, patchover_net::Probe::Https(trust));
        assert_eq!((hs.path.as_str(), hs.status), ("/ready", 204));
        assert_eq!(hc.expecting("").expect, "up");
    }
}
