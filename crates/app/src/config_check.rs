//! `patchover config check [FILE]`: the typed loader run over a whole file, every section,
//! without acting on anything; a good file's one-line summary, or where it is wrong.

use std::path::{Path, PathBuf};

use patchover_core::config::ConfigError;
use patchover_core::{Config, HealthProbe, HostFacts};
use serde::{Deserialize, Serialize};

/// What `config check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigCheck {
    pub file: PathBuf,
    /// `None` when the file is wrong.
    pub summary: Option<ConfigSummary>,
    pub errors: Vec<ConfigProblem>,
}

/// One thing wrong with the file: where (when the loader knows) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigProblem {
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

/// What a good file sets up, in a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSummary {
    /// `id (backend)` of each LC.
    pub lcs: Vec<String>,
    pub service_address: Option<String>,
    pub service_port: u16,
    /// How the service is checked (`http /health`, `tcp`, `command pg_isready`), if at all.
    pub health: Option<String>,
    /// Every feed, index and apt.
    pub monitor_feeds: Option<usize>,
    /// Of those, the `kind = "apt"` feeds.
    #[serde(default)]
    pub apt_feeds: usize,
    pub trusted_keys: usize,
    /// `[[bundles.scoped_keys]]`: keys trusted only for apt bundles.
    #[serde(default)]
    pub apt_keys: usize,
    pub yara: bool,
    pub daemon_socket: PathBuf,
}

impl ConfigCheck {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `FILE: ok: …summary…`, or one `file:line: key: message` line per error.
    pub fn lines(&self) -> Vec<String> {
        let file = self.file.display();
        if let Some(s) = &self.summary {
            return vec![format!("{file}: ok: {s}")];
        }
        self.errors
            .iter()
            .map(|e| match (e.line, &e.key) {
                (Some(line), Some(key)) => format!("{file}:{line}: {key}: {}", e.message),
                _ => format!("{file}: {}", e.message),
            })
            .collect()
    }
}

impl std::fmt::Display for ConfigSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lcs = if self.lcs.is_empty() {
            "none".to_owned()
        } else {
            self.lcs.join(", ")
        };
        write!(f, "{} LCs ({lcs}); service ", self.lcs.len())?;
        match &self.service_address {
            Some(a) => write!(f, "{a}")?,
            None => write!(f, "address not set")?,
        }
        write!(f, " port {}, check ", self.service_port)?;
        write!(f, "{}", self.health.as_deref().unwrap_or("none"))?;
        match self.monitor_feeds {
            Some(n) if self.apt_feeds > 0 => {
                write!(f, "; monitor: {n} feeds ({} apt)", self.apt_feeds)?
            }
            Some(n) => write!(f, "; monitor: {n} feeds")?,
            None => write!(f, "; no monitor")?,
        }
        write!(f, "; {} trusted bundle keys", self.trusted_keys)?;
        if self.apt_keys > 0 {
            write!(f, " and {} for apt bundles only", self.apt_keys)?;
        }
        if self.yara {
            write!(f, "; yara rules")?;
        }
        write!(f, "; daemon socket {}", self.daemon_socket.display())
    }
}

/// Loads `file` with the typed loader (every section checked) on this host.
pub fn check(file: &Path) -> ConfigCheck {
    check_with(file, &HostFacts::probe())
}

/// [`check`] against given host facts.
pub fn check_with(file: &Path, host: &HostFacts) -> ConfigCheck {
    match Config::load(file, host) {
        Ok(c) => ConfigCheck {
            file: file.to_owned(),
            summary: Some(summary(&c)),
            errors: Vec::new(),
        },
        Err(e) => ConfigCheck {
            file: file.to_owned(),
            summary: None,
            errors: vec![problem(&e)],
        },
    }
}

fn problem(e: &ConfigError) -> ConfigProblem {
    match e.at() {
        Some(at) => ConfigProblem {
            line: Some(at.line),
            key: Some(at.key.to_owned()),
            message: at.message.to_owned(),
        },
        None => ConfigProblem {
            line: None,
            key: None,
            message: patchover_core::error_chain(e),
        },
    }
}

fn summary(c: &Config) -> ConfigSummary {
    ConfigSummary {
        lcs: c
            .lcs
            .iter()
            .map(|l| format!("{} ({})", l.id, l.backend))
            .collect(),
        service_address: c.network.service_address.map(|a| a.to_string()),
        service_port: c.service.port,
        health: c.service.health.as_ref().map(|h| match h {
            HealthProbe::Http { path, tls, .. } => {
                format!("{} {path}", if tls.is_some() { "https" } else { "http" })
            }
            HealthProbe::Tcp { .. } => "tcp".to_owned(),
            HealthProbe::Command { argv, .. } => format!("command {}", argv.join(" ")),
        }),
        monitor_feeds: c
            .monitor
            .as_ref()
            .map(|m| m.feeds.len() + m.apt_feeds.len()),
        apt_feeds: c.monitor.as_ref().map_or(0, |m| m.apt_feeds.len()),
        trusted_keys: c.bundles.trusted_keys.len(),
        apt_keys: c.bundles.scoped_keys.len(),
        yara: c.yara.is_some(),
        daemon_socket: c.daemon.socket.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts {
        cpus: 4,
        memory_mib: 4096,
    };

    fn checked(text: &str) -> (tempfile::TempDir, ConfigCheck) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("po.toml");
        std::fs::write(&f, text).unwrap();
        let c = check_with(&f, &HOST);
        (d, c)
    }

    #[test]
    fn a_good_file_is_summed_up_in_one_line() {
        let (d, c) = checked(
            "state_dir = \"/tmp/s\"\n[network]\nbridge = \"b0\"\nservice_address = \"10.1.0.10/24\"\n[[lc]]\nid = \"a\"\ncpu = 0\ncpu_share = 50\nmemory_mib = 64\nsystem_disk = { path = \"/srv/a\" }\n[service]\nport = 8080\nhealth = { kind = \"tcp\" }\n",
        );
        assert!(c.ok(), "{c:?}");
        let want = format!(
            "{}: ok: 1 LCs (a (ns)); service 10.1.0.10/24 port 8080, check tcp; no monitor; 0 trusted bundle keys; daemon socket /run/patchover/daemon/patchover.sock",
            d.path().join("po.toml").display()
        );
        assert_eq!(c.lines(), vec![want]);
        // An apt feed and its key trusted only for apt bundles are counted.
        let (d, c) = checked(
            "[[lc]]\nid = \"a\"\ncpu = 0\ncpu_share = 50\nmemory_mib = 64\nsystem_disk = { path = \"/srv/a\" }\n[bundles]\ntrusted_keys = [\"/k/r.pub\"]\n[[bundles.scoped_keys]]\npath = \"/k/apt.pub\"\nscope = \"apt\"\narchive_keyrings = [\"/k/a.gpg\"]\n[[monitor.feeds]]\nname = \"i\"\nurl = \"http://127.0.0.1:1/i.json\"\ntrusted_keys = [\"/k/f.pub\"]\n[[monitor.feeds]]\nname = \"deb\"\nkind = \"apt\"\nsigning_key = \"/k/apt.key\"\nlcs = [\"a\"]\n",
        );
        let line = &c.lines()[0];
        assert!(
            line.contains(
                "monitor: 2 feeds (1 apt); 1 trusted bundle keys and 1 for apt bundles only"
            ),
            "{line} ({})",
            d.path().display()
        );
    }

    #[test]
    fn a_bad_file_is_its_line_key_and_message() {
        let (d, c) = checked("[network]\nbridge = \"b0\"\nservice_address = \"10.0.0.300/24\"\n");
        assert!(!c.ok());
        let line = &c.lines()[0];
        let want = format!(
            "{}:3: network.service_address: ",
            d.path().join("po.toml").display()
        );
        assert!(line.starts_with(&want), "{line}");
        let (_d, missing) = (d, check_with(Path::new("/nonexistent/po.toml"), &HOST));
        assert_eq!(missing.errors[0].line, None);
        assert!(
            missing.lines()[0].contains("cannot read config"),
            "{:?}",
            missing.lines()
        );
    }
}
