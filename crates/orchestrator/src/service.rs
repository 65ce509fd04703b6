//! The service the LCs run: how to check it and how to restart it on the standby.

use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `[service]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// The TCP port the service listens on.
    #[serde(default = "default_port")]
    pub port: u16,
    /// A GET path whose answer names the LC that serves it (the demo's `/health`).
    #[serde(default = "default_health")]
    pub health_path: String,
    /// A GET path whose answer is the service's version (the demo's `/version`).
    #[serde(default = "default_version")]
    pub version_path: String,
    /// The command, run inside the standby, that restarts the service after the application
    /// disk's final catch-up (so it reads the data as of the cut).
    #[serde(default = "default_restart")]
    pub restart: Vec<String>,
    /// Run inside the old LC at the switch: stop keeping connections alive (answer with
    /// `Connection: close`, close idle keep-alive connections), keep serving.
    #[serde(default = "default_drain")]
    pub drain: Vec<String>,
    /// Undoes `drain`.
    #[serde(default = "default_resume")]
    pub resume: Vec<String>,
    /// `seamless` hand-off, run inside the old LC: finish the requests in flight, hold the rest;
    /// must exit 0 only once nothing is in flight (see `patchover_net::ServiceControl::park`).
    #[serde(default = "default_park")]
    pub park: Vec<String>,
    /// Run inside the old LC after `park`: send the held and later requests to the standby;
    /// `{to}` is replaced by the standby's `ADDR:PORT`.
    #[serde(default = "default_forward")]
    pub forward: Vec<String>,
    /// Undoes `park` when the hand-off is called off before `forward`.
    #[serde(default = "default_unpark")]
    pub unpark: Vec<String>,
}

fn signal_demo(sig: &str) -> Vec<String> {
    vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!("kill -{sig} $(cat /var/run/patchover-demo.pid)"),
    ]
}
fn default_drain() -> Vec<String> {
    signal_demo("USR1")
}
fn default_resume() -> Vec<String> {
    signal_demo("USR2")
}

fn demo_ctl(args: &[&str]) -> Vec<String> {
    ["/usr/bin/patchover-demo", "ctl"]
        .iter()
        .chain(args)
        .map(|s| (*s).to_owned())
        .collect()
}
fn default_park() -> Vec<String> {
    demo_ctl(&["park"])
}
fn default_forward() -> Vec<String> {
    demo_ctl(&["forward", "{to}"])
}
fn default_unpark() -> Vec<String> {
    demo_ctl(&["resume"])
}

fn default_port() -> u16 {
    80
}
fn default_health() -> String {
    "/health".to_owned()
}
fn default_version() -> String {
    "/version".to_owned()
}
fn default_restart() -> Vec<String> {
    vec!["/etc/init.d/S50demo".to_owned(), "restart".to_owned()]
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            port: default_port(),
            health_path: default_health(),
            version_path: default_version(),
            restart: default_restart(),
            drain: default_drain(),
            resume: default_resume(),
            park: default_park(),
            forward: default_forward(),
            unpark: default_unpark(),
        }
    }
}

impl ServiceSettings {
    pub fn from_extra(
        extra: &std::collections::BTreeMap<String, toml::Value>,
    ) -> Result<ServiceSettings, String> {
        match extra.get("service") {
            None => Ok(ServiceSettings::default()),
            Some(v) => {
                let s: ServiceSettings = v
                    .clone()
                    .try_into()
                    .map_err(|e| format!("config [service]: {e}"))?;
                if s.restart.is_empty() {
                    return Err("config [service]: `restart` needs a command".into());
                }
                Ok(s)
            }
        }
    }

    pub fn health(&self, expect: &str) -> patchover_net::HealthCheck {
        patchover_net::HealthCheck::new(self.port, &self.health_path, expect)
    }
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
/// commands inside the LC an endpoint names.
pub struct LcServiceControl<'a> {
    pub backend: &'a dyn patchover_lc::LcBackend,
    pub lcs: &'a [patchover_core::LcSpec],
    pub settings: &'a ServiceSettings,
}

impl LcServiceControl<'_> {
    fn run(
        &self,
        ep: &patchover_net::Endpoint,
        argv: &[String],
    ) -> Result<(), patchover_net::BoxError> {
        if argv.is_empty() {
            return Ok(());
        }
        let spec = self
            .lcs
            .iter()
            .find(|l| l.id.as_str() == ep.name)
            .ok_or_else(|| format!("no LC {}", ep.name))?;
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
    fn drain(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        self.run(ep, &self.settings.drain)
    }
    fn resume(&mut self, ep: &patchover_net::Endpoint) -> Result<(), patchover_net::BoxError> {
        self.run(ep, &self.settings.resume)
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
