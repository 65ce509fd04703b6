//! The TOML configuration: where state lives, the bridge, the service address, the host's
//! LCs with their resources, and every other section (`[service]`, `[bundles]`, `[monitor]`,
//! `[yara]`, `[daemon]`).
//!
//! Parsing happens in two steps (raw TOML → validated [`Config`]) so that every error can name
//! the file, the line and the key, and say what to do. The whole file is checked here, once:
//! an unknown key in any section is an error at its line, and no other crate parses TOML.
//! Loading a config changes nothing on the host.

mod front;
mod monitor;
mod sections;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use front::{FrontKind, FrontSettings};
pub use monitor::{
    AptFeedConfig, FeedConfig, MailServer, MonitorConfig, PasswordFileError, TlsMode, valid_address,
};
pub use sections::{
    BundlesSection, DaemonSection, KeyScope, ScopedKey, TlsPaths, YaraSection, default_socket,
    parse_token_hash,
};
pub use service::{HealthProbe, ServiceSettings, TlsTrust};

use crate::model::{
    BackendKind, CpuAlloc, DiskKind, DiskRole, DiskSpec, Ipv4Cidr, LcId, LcSpec, MacAddr, NicSpec,
    QemuBoot, check_iface_name,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/patchover/patchover.toml";

/// Facts about the host that bound a config: a config may not hand out more than this.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl HostFacts {
    /// Reads the CPU count and `MemTotal` of this host.
    pub fn probe() -> HostFacts {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(u64::MAX, |kb| kb / 1024);
        HostFacts { cpus, memory_mib }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}; pass another with --config PATH", path = path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}", path = path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        col: usize,
        /// The dotted key the error's line is about (its table and key), e.g. `network.bogus`.
        key: String,
        message: String,
    },
    #[error("{path}:{line}: `{key}`: {message}", path = path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path}: {what} is not set; {hint}", path = path.display())]
    Missing {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
}

/// Where the store (the tables and the run journal) lives: systemd's `StateDirectory=patchover`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/patchover";
/// Where running LCs' records live (`lc/`, `disks/`, `runs/`, `blockserver/`): they must
/// outlive the daemon (not a reboot, like the processes and mounts they describe), so this is
/// the parent of the unit's `RuntimeDirectory=patchover/daemon`, which systemd never removes.
pub const DEFAULT_RUN_DIR: &str = "/run/patchover";
/// Every LC's cgroup is `<hierarchy>/<cgroup_parent>/<id>`: by default inside the delegated
/// subtree of `patchover.service` (`Delegate=yes`).
pub const DEFAULT_CGROUP_PARENT: &str = "system.slice/patchover.service/lcs";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Name of the cgroup under which every LC's cgroup is made.
    pub cgroup_parent: String,
    pub network: NetworkConfig,
    pub lcs: Vec<LcSpec>,
    /// `[service]`: how to check, restart and hand off the service (defaults: the demo's).
    pub service: ServiceSettings,
    /// `[bundles]`: the keys whose signatures are trusted, size limits.
    pub bundles: BundlesSection,
    /// `[monitor]`, when configured.
    pub monitor: Option<MonitorConfig>,
    /// `[yara]`, when configured: the malware check before the copy.
    pub yara: Option<YaraSection>,
    /// `[daemon]` (defaults when absent).
    pub daemon: DaemonSection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub bridge: String,
    /// The host's own address on the bridge, if it has one.
    pub bridge_address: Option<Ipv4Cidr>,
    /// The address clients use to reach the service.
    pub service_address: Option<Ipv4Cidr>,
}

impl Config {
    pub fn lc(&self, id: &str) -> Option<&LcSpec> {
        self.lcs.iter().find(|l| l.id.as_str() == id)
    }

    /// The address clients use to reach the service, which switching modes and `service
    /// assign` need: an error that says where to set it when the config has none.
    pub fn service_address(&self) -> Result<Ipv4Cidr, ConfigError> {
        self.network
            .service_address
            .ok_or_else(|| ConfigError::Missing {
                path: self.path.clone(),
                what: "network.service_address",
                hint: "set the address clients use, e.g. service_address = \"10.77.0.10/24\" under [network]",
            })
    }

    /// The `[monitor]` section, which the monitor's verbs need.
    pub fn monitor(&self) -> Result<&MonitorConfig, ConfigError> {
        self.monitor.as_ref().ok_or_else(|| ConfigError::Missing {
            path: self.path.clone(),
            what: "the [monitor] section",
            hint: "add one (see docs/monitor.md)",
        })
    }

    /// The path of the SQLite store.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    pub fn load(path: &Path, host: &HostFacts) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text, host)
    }

    pub fn parse(path: &Path, text: &str, host: &HostFacts) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Syntax {
                path: path.to_owned(),
                line,
                col,
                key: key_at_line(text, line),
                message: e.message().trim().to_owned(),
            }
        })?;
        Validator { path, text, host }.validate(raw)
    }
}

/// Where a load error is: its file, line and dotted key, and what is wrong
/// (`patchover config check` prints it as `file:line: key: message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAt<'a> {
    pub path: &'a Path,
    pub line: usize,
    pub key: &'a str,
    pub message: &'a str,
}

impl ConfigError {
    /// The place of an error in the file; `None` for one that has none (unreadable file, a
    /// setting a verb needs that the file lacks).
    pub fn at(&self) -> Option<ErrorAt<'_>> {
        match self {
            ConfigError::Syntax {
                path,
                line,
                key,
                message,
                ..
            }
            | ConfigError::Invalid {
                path,
                line,
                key,
                message,
            } => Some(ErrorAt {
                path,
                line: *line,
                key,
                message,
            }),
            ConfigError::Read { .. } | ConfigError::Missing { .. } => None,
        }
    }
}

/// The dotted key of line `line` (1-based) of TOML `text`: the table header in force there
/// and the key the line sets (`network.bogus`); a header line is its table's name.
fn key_at_line(text: &str, line: usize) -> String {
    let mut table = String::new();
    let mut key = String::new();
    for l in text.lines().take(line) {
        let l = l.trim();
        if let Some(h) = l.strip_prefix('[') {
            table = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            key.clear();
        } else if let Some((k, _)) = l.split_once('=') {
            key = k.trim().trim_matches('"').to_owned();
        } else {
            key.clear();
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    cgroup_parent: Option<Spanned<String>>,
    network: Option<RawNetwork>,
    #[serde(default)]
    lc: Vec<RawLc>,
    bundles: Option<sections::RawBundles>,
    monitor: Option<monitor::RawMonitor>,
    daemon: Option<sections::RawDaemon>,
    yara: Option<sections::RawYara>,
    service: Option<Spanned<service::RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    bridge: Option<Spanned<String>>,
    bridge_address: Option<Spanned<String>>,
    service_address: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLc {
    id: Spanned<String>,
    backend: Option<BackendKind>,
    cpu: Option<Spanned<u32>>,
    cpu_share: Spanned<u32>,
    memory_mib: Spanned<u64>,
    hostname: Option<String>,
    init: Option<PathBuf>,
    kernel: Option<Spanned<PathBuf>>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    system_disk: RawDisk,
    app_disk: Option<RawDisk>,
    #[serde(default)]
    nic: Vec<RawNic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    path: Spanned<PathBuf>,
    kind: Option<DiskKind>,
    mount: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNic {
    name: Spanned<String>,
    mac: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    gateway: Option<Spanned<String>>,
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    host: &'a HostFacts,
}

impl Validator<'_> {
    fn err<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_col(self.text, at.span().start).0,
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let cgroup_parent = match raw.cgroup_parent {
            Some(c) => {
                let ok = c.get_ref().split('/').all(|name| {
                    !name.is_empty()
                        && name != "."
                        && name != ".."
                        && name.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
                        })
                });
                if !ok {
                    return Err(self.err(
                        &c,
                        "cgroup_parent",
                        "must be a relative cgroup path: names of letters, digits, '-', '_' and '.' joined by '/' (e.g. \"system.slice/patchover.service/lcs\")",
                    ));
                }
                c.into_inner()
            }
            None => DEFAULT_CGROUP_PARENT.to_owned(),
        };
        let network = match raw.network {
            Some(n) => NetworkConfig {
                bridge: match n.bridge {
                    Some(b) => {
                        check_iface_name(b.get_ref())
                            .map_err(|e| self.err(&b, "network.bridge", e))?;
                        b.into_inner()
                    }
                    None => "pobr0".to_owned(),
                },
                bridge_address: self.opt_cidr(n.bridge_address, "network.bridge_address")?,
                service_address: self.opt_cidr(n.service_address, "network.service_address")?,
            },
            None => NetworkConfig {
                bridge: "pobr0".to_owned(),
                bridge_address: None,
                service_address: None,
            },
        };

        let mut lcs: Vec<LcSpec> = Vec::new();
        let mut seen_ids: HashMap<String, usize> = HashMap::new();
        let mut disk_owner: HashMap<PathBuf, String> = HashMap::new();
        let mut cpu_used: BTreeMap<u32, u32> = BTreeMap::new();
        let mut memory_used: u64 = 0;
        for lc in raw.lc {
            let id: LcId = lc
                .id
                .get_ref()
                .parse()
                .map_err(|m: String| self.err(&lc.id, "lc.id", m))?;
            let line = line_col(self.text, lc.id.span().start).0;
            if let Some(first) = seen_ids.insert(id.to_string(), line) {
                return Err(self.err(
                    &lc.id,
                    "lc.id",
                    format!("duplicate LC id \"{id}\" (first defined on line {first}); give each LC its own id"),
                ));
            }
            let key = |k: &str| format!("lc.{id}.{k}");

            let cpu_index = lc.cpu.as_ref().map_or(0, |c| *c.get_ref());
            if let Some(c) = &lc.cpu
                && *c.get_ref() >= self.host.cpus
            {
                return Err(self.err(
                    c,
                    &key("cpu"),
                    format!(
                        "CPU {} does not exist; this host has CPUs 0-{}",
                        c.get_ref(),
                        self.host.cpus - 1
                    ),
                ));
            }
            let share = *lc.cpu_share.get_ref();
            if share == 0 || share > 100 {
                return Err(self.err(
                    &lc.cpu_share,
                    &key("cpu_share"),
                    "a percentage of one CPU, 1-100",
                ));
            }
            let used = cpu_used.entry(cpu_index).or_default();
            *used += share;
            if *used > 100 {
                return Err(self.err(
                    &lc.cpu_share,
                    &key("cpu_share"),
                    format!(
                        "CPU {cpu_index} would be handed out {used}% (more than 100%); lower the shares or move an LC to another CPU"
                    ),
                ));
            }
            let mem = *lc.memory_mib.get_ref();
            if mem < 16 {
                return Err(self.err(&lc.memory_mib, &key("memory_mib"), "at least 16 MiB"));
            }
            memory_used += mem;
            if memory_used > self.host.memory_mib {
                return Err(self.err(
                    &lc.memory_mib,
                    &key("memory_mib"),
                    format!(
                        "the LCs would get {memory_used} MiB in all, more than this host's {} MiB; lower memory_mib",
                        self.host.memory_mib
                    ),
                ));
            }

            let system_disk = self.disk(lc.system_disk, DiskRole::System, &id, &mut disk_owner)?;
            let app_disk = lc
                .app_disk
                .map(|d| self.disk(d, DiskRole::Application, &id, &mut disk_owner))
                .transpose()?;

            let mut nics = Vec::new();
            for (i, n) in lc.nic.into_iter().enumerate() {
                let name = n.name.get_ref();
                check_iface_name(name).map_err(|e| self.err(&n.name, &key("nic.name"), e))?;
                if nics.iter().any(|x: &NicSpec| &x.name == name) {
                    return Err(self.err(
                        &n.name,
                        &key("nic.name"),
                        format!("two NICs named {name:?}; give each its own name"),
                    ));
                }
                let mac = match &n.mac {
                    Some(m) => m
                        .get_ref()
                        .parse()
                        .map_err(|e: String| self.err(m, &key("nic.mac"), e))?,
                    None => MacAddr::derive(&format!("{id}/{i}")),
                };
                let address = self.opt_cidr(n.address, &key("nic.address"))?;
                let gateway = match &n.gateway {
                    Some(g) => Some(g.get_ref().parse::<Ipv4Addr>().map_err(|_| {
                        self.err(g, &key("nic.gateway"), "an IPv4 address like 10.77.0.1")
                    })?),
                    None => None,
                };
                nics.push(NicSpec {
                    name: n.name.into_inner(),
                    mac,
                    address,
                    gateway,
                    detached: false,
                });
            }
            if nics.len() > 9 {
                return Err(ConfigError::Invalid {
                    path: self.path.to_owned(),
                    line,
                    key: key("nic"),
                    message: "at most 9 NICs per LC".to_owned(),
                });
            }

            let backend = lc.backend.unwrap_or_default();
            let qemu = match (backend, lc.kernel) {
                (BackendKind::Qemu, Some(k)) => Some(QemuBoot {
                    kernel: k.into_inner(),
                    initrd: lc.initrd,
                    append: lc.append.unwrap_or_default(),
                }),
                (BackendKind::Qemu, None) => {
                    return Err(ConfigError::Invalid {
                        path: self.path.to_owned(),
                        line,
                        key: key("kernel"),
                        message: "a qemu LC boots a kernel: set kernel = \"DIR/vmlinuz\" and initrd = \"DIR/initrd.img\" (built by `patchover image build-demo --qemu DIR`)".to_owned(),
                    });
                }
                (BackendKind::Ns, Some(k)) => {
                    return Err(self.err(
                        &k,
                        &key("kernel"),
                        "only qemu LCs boot a kernel; remove it or set backend = \"qemu\"",
                    ));
                }
                (BackendKind::Ns, None) => None,
            };
            if backend == BackendKind::Qemu
                && let Some(d) = std::iter::once(&system_disk)
                    .chain(app_disk.as_ref())
                    .find(|d| d.kind != DiskKind::Image)
            {
                return Err(ConfigError::Invalid {
                    path: self.path.to_owned(),
                    line,
                    key: key(match d.role {
                        DiskRole::System => "system_disk.path",
                        DiskRole::Application => "app_disk.path",
                    }),
                    message: format!(
                        "a qemu LC's disks are image files (raw or qcow2), and {} is a directory",
                        d.path.display()
                    ),
                });
            }
            lcs.push(LcSpec {
                qemu,
                hostname: lc.hostname.unwrap_or_else(|| id.to_string()),
                backend,
                cpu: CpuAlloc {
                    cpu: cpu_index,
                    share_pct: share,
                },
                memory_mib: mem,
                init: lc.init.unwrap_or_else(|| PathBuf::from("/sbin/init")),
                system_disk,
                app_disk,
                nics,
                id,
            });
        }

        let run_dir = raw
            .run_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
        let service = self.service(raw.service)?;
        let bundles = self.bundles(raw.bundles)?;
        let ids: Vec<String> = lcs.iter().map(|l| l.id.to_string()).collect();
        let monitor = self.monitor(raw.monitor, &ids)?;
        let yara = self.yara(raw.yara)?;
        let daemon = self.daemon(raw.daemon, &run_dir)?;

        Ok(Config {
            path: self.path.to_owned(),
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            run_dir,
            cgroup_parent,
            network,
            lcs,
            service,
            bundles,
            monitor,
            yara,
            daemon,
        })
    }

    fn opt_cidr(
        &self,
        v: Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<Ipv4Cidr>, ConfigError> {
        v.map(|s| {
            s.get_ref()
                .parse()
                .map_err(|e: String| self.err(&s, key, e))
        })
        .transpose()
    }

    fn disk(
        &self,
        raw: RawDisk,
        role: DiskRole,
        id: &LcId,
        owners: &mut HashMap<PathBuf, String>,
    ) -> Result<DiskSpec, ConfigError> {
        let which = match role {
            DiskRole::System => "system_disk",
            DiskRole::Application => "app_disk",
        };
        let key = format!("lc.{id}.{which}.path");
        let path = raw.path.get_ref().clone();
        if !path.is_absolute() {
            return Err(self.err(&raw.path, &key, "use an absolute path"));
        }
        let norm = normalize(&path);
        if let Some(other) = owners.get(&norm) {
            return Err(self.err(
                &raw.path,
                &key,
                format!(
                    "{} is already a disk of {other}; two LCs cannot share a disk, give each its own",
                    path.display()
                ),
            ));
        }
        owners.insert(norm, format!("LC {id}"));
        let kind = raw.kind.unwrap_or_else(|| DiskKind::of_path(&path));
        let mount = match (role, raw.mount) {
            (DiskRole::System, Some(m)) => {
                return Err(self.err(
                    &m,
                    &format!("lc.{id}.system_disk.mount"),
                    "the system disk is always mounted at /; remove this key",
                ));
            }
            (DiskRole::System, None) => PathBuf::from("/"),
            (DiskRole::Application, Some(m)) => {
                let p = m.get_ref();
                if !p.is_absolute()
                    || p == Path::new("/")
                    || p.components().any(|c| c.as_os_str() == "..")
                {
                    return Err(self.err(
                        &m,
                        &format!("lc.{id}.app_disk.mount"),
                        "an absolute path inside the LC other than /, without '..'",
                    ));
                }
                p.clone()
            }
            (DiskRole::Application, None) => PathBuf::from("/data"),
        };
        Ok(DiskSpec {
            role,
            path,
            kind,
            mount,
        })
    }
}

/// Lexical normalization (no I/O): drops `.` and trailing slashes so that two spellings of a
/// path compare equal.
fn normalize(p: &Path) -> PathBuf {
    p.components().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts {
        cpus: 2,
        memory_mib: 1024,
    };

    pub(crate) const GOOD: &str = r#"
state_dir = "/tmp/po/state"
run_dir = "/tmp/po/run"

[network]
bridge = "pobr0"
service_address = "10.77.0.10/24"

[[lc]]
id = "lc1"
cpu = 0
cpu_share = 50
memory_mib = 256
system_disk = { path = "/srv/lc1/sys" }
app_disk = { path = "/srv/lc1/app", mount = "/data" }
nic = [{ name = "eth0", address = "10.77.0.10/24" }]

[[lc]]
id = "lc2"
cpu = 0
cpu_share = 50
memory_mib = 256
system_disk = { path = "/srv/lc2/sys.img" }
"#;

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/po.toml"), text, &HOST)
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.lcs.len(), 2);
        let lc1 = c.lc("lc1").unwrap();
        assert_eq!(lc1.cpu.share_pct, 50);
        assert_eq!(lc1.app_disk.as_ref().unwrap().mount, PathBuf::from("/data"));
        assert_eq!(lc1.nics[0].address.unwrap().to_string(), "10.77.0.10/24");
        assert_eq!(c.lc("lc2").unwrap().system_disk.kind, DiskKind::Image);
        assert_eq!(c.store_path(), PathBuf::from("/tmp/po/state/state.db"));
    }

    #[test]
    fn qemu_lcs_boot_a_kernel_from_image_disks() {
        let text = GOOD.replace(
            "id = \"lc2\"\n",
            "id = \"lc2\"\nbackend = \"qemu\"\nkernel = \"/img/vmlinuz\"\ninitrd = \"/img/initrd.img\"\n",
        );
        let c = parse(&text).unwrap();
        let q = c.lc("lc2").unwrap().qemu.clone().unwrap();
        assert_eq!(q.kernel, PathBuf::from("/img/vmlinuz"));
        assert_eq!(q.initrd, Some(PathBuf::from("/img/initrd.img")));
        assert_eq!(c.lc("lc1").unwrap().qemu, None);

        // No kernel: the error names the key and how to get one.
        let (line, key, msg) =
            invalid(&GOOD.replace("id = \"lc2\"\n", "id = \"lc2\"\nbackend = \"qemu\"\n"));
        assert_eq!((line, key.as_str()), (19, "lc.lc2.kernel"));
        assert!(msg.contains("build-demo --qemu"), "{msg}");

        // A directory disk cannot back a VM.
        let text = GOOD.replace(
            "id = \"lc1\"\n",
            "id = \"lc1\"\nbackend = \"qemu\"\nkernel = \"/img/vmlinuz\"\n",
        );
        let (_, key, msg) = invalid(&text);
        assert_eq!(key, "lc.lc1.system_disk.path");
        assert!(msg.contains("image files"), "{msg}");

        // A kernel on an ns LC is a mistake, reported at its line.
        let (line, key, _) =
            invalid(&GOOD.replace("id = \"lc2\"\n", "id = \"lc2\"\nkernel = \"/k\"\n"));
        assert_eq!((line, key.as_str()), (20, "lc.lc2.kernel"));
    }

    fn invalid(text: &str) -> (usize, String, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn defaults_and_cgroup_parent_paths() {
        let bare = "[network]\nbridge = \"pobr0\"\n";
        let c = parse(bare).unwrap();
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.run_dir, PathBuf::from("/run/patchover"));
        assert_eq!(c.cgroup_parent, "system.slice/patchover.service/lcs");
        for ok in [
            "patchover",
            "po-test_1",
            "system.slice/patchover.service/lcs",
        ] {
            let c = parse(&format!("cgroup_parent = \"{ok}\"\n{bare}")).unwrap();
            assert_eq!(c.cgroup_parent, ok);
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../up",
            "a/./b",
            "a b",
            "a/../../etc",
        ] {
            let (line, key, msg) = invalid(&format!("cgroup_parent = \"{bad}\"\n{bare}"));
            assert_eq!((line, key.as_str()), (1, "cgroup_parent"), "{bad}");
            assert!(msg.contains("relative cgroup path"), "{bad}: {msg}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace(
            "memory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
            "memory_mib = 256\ncolour = 3\nsystem_disk = { path = \"/srv/lc2",
        );
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/po.toml:23:"), "{msg}");
        assert!(msg.contains("unknown field `colour`"), "{msg}");
    }

    #[test]
    fn duplicate_id() {
        let (line, key, msg) = invalid(&GOOD.replace("id = \"lc2\"", "id = \"lc1\""));
        assert_eq!(line, 19);
        assert_eq!(key, "lc.id");
        assert!(
            msg.contains("duplicate LC id \"lc1\" (first defined on line 10)"),
            "{msg}"
        );
    }

    #[test]
    fn shared_disk() {
        let (line, key, msg) = invalid(&GOOD.replace("/srv/lc2/sys.img", "/srv/lc1/app/"));
        assert_eq!(line, 23);
        assert_eq!(key, "lc.lc2.system_disk.path");
        assert!(msg.contains("already a disk of LC lc1"), "{msg}");
    }

    #[test]
    fn cpu_overcommit() {
        let (line, key, msg) = invalid(&GOOD.replace(
            "cpu_share = 50\nmemory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
            "cpu_share = 51\nmemory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
        ));
        assert_eq!((line, key.as_str()), (21, "lc.lc2.cpu_share"));
        assert!(msg.contains("CPU 0 would be handed out 101%"), "{msg}");
    }

    #[test]
    fn memory_beyond_host() {
        let (_, key, msg) = invalid(&GOOD.replace(
            "memory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
            "memory_mib = 900\nsystem_disk = { path = \"/srv/lc2",
        ));
        assert_eq!(key, "lc.lc2.memory_mib");
        assert!(
            msg.contains("1156 MiB in all, more than this host's 1024 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn nonexistent_cpu_and_bad_share() {
        let (_, key, msg) = invalid(&GOOD.replace(
            "cpu = 0\ncpu_share = 50\nmemory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
            "cpu = 7\ncpu_share = 50\nmemory_mib = 256\nsystem_disk = { path = \"/srv/lc2",
        ));
        assert_eq!(key, "lc.lc2.cpu");
        assert!(msg.contains("CPU 7 does not exist"), "{msg}");
        let (_, key, _) = invalid(&GOOD.replacen("cpu_share = 50", "cpu_share = 0", 1));
        assert_eq!(key, "lc.lc1.cpu_share");
    }

    #[test]
    fn bad_values() {
        let (_, key, msg) = invalid(&GOOD.replace("10.77.0.10/24\" }]", "10.77.0.300/24\" }]"));
        assert_eq!(key, "lc.lc1.nic.address");
        assert!(msg.contains("invalid address"), "{msg}");
        let (_, key, _) = invalid(&GOOD.replace("id = \"lc2\"", "id = \"LC 2\""));
        assert_eq!(key, "lc.id");
        let (_, key, _) = invalid(&GOOD.replace("/srv/lc2/sys.img", "relative/sys"));
        assert_eq!(key, "lc.lc2.system_disk.path");
        let (_, key, _) = invalid(&GOOD.replace("mount = \"/data\"", "mount = \"/\""));
        assert_eq!(key, "lc.lc1.app_disk.mount");
    }

    /// Issue 22, item 5: a NIC name reached a guest's `sh -c` unquoted and the loader let `;`,
    /// `$` and `(` through. Names are now interface names (1-15 of a-z 0-9 _ -), refused at
    /// their line with what to use; the bridge's name the same.
    #[test]
    fn r22_nic_and_bridge_names_that_could_reach_a_shell_are_refused() {
        for bad in [
            "a;touch /x",
            "$(id)",
            "`id`",
            "eth0'",
            "a\"b",
            "eth 1",
            "-h",
            "ETH0",
            "eth0.100",
            "",
            "abcdefghijklmnop",
        ] {
            let toml_str = toml::Value::String(bad.to_owned()).to_string();
            let text = GOOD.replace("name = \"eth0\"", &format!("name = {toml_str}"));
            let (line, key, msg) = invalid(&text);
            assert_eq!((line, key.as_str()), (16, "lc.lc1.nic.name"), "{bad:?}");
            assert!(
                msg.contains("invalid interface name") && msg.contains("a-z, 0-9, '_' and '-'"),
                "{bad:?}: {msg}"
            );
            let text = GOOD.replace("bridge = \"pobr0\"", &format!("bridge = {toml_str}"));
            let (_, key, _) = invalid(&text);
            assert_eq!(key, "network.bridge", "{bad:?}");
        }
        for good in ["eth0", "e", "po_br-1", "abcdefghijklmno"] {
            let c = parse(&GOOD.replace("name = \"eth0\"", &format!("name = \"{good}\""))).unwrap();
            assert_eq!(c.lc("lc1").unwrap().nics[0].name, good);
        }
    }

    /// Issue 24: an apt feed, and its key trusted only for apt bundles.
    #[test]
    fn an_apt_feed_and_a_scoped_key_are_read() {
        let c = parse(
            "[bundles]\ntrusted_keys = [\"/k/release.pub\"]\n[[bundles.scoped_keys]]\npath = \"/k/apt.pub\"\nscope = \"apt\"\narchive_keyrings = [\"/k/a.gpg\"]\n[[monitor.feeds]]\nname = \"debian\"\nkind = \"apt\"\nsigning_key = \"/k/apt.key\"\nsources = [\"deb [signed-by=/k/a.gpg] http://127.0.0.1:1/ bookworm-security main\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.bundles.scoped_keys,
            [ScopedKey {
                path: "/k/apt.pub".into(),
                scope: KeyScope::Apt,
                archive_keyrings: vec!["/k/a.gpg".into()],
            }]
        );
        let m = c.monitor().unwrap();
        assert!(m.feeds.is_empty());
        assert_eq!(m.apt_feeds.len(), 1);
        assert_eq!(m.apt_feeds[0].signing_key, Path::new("/k/apt.key"));
        assert_eq!(m.apt_feeds[0].sources.len(), 1);
        let e =
            parse("[[bundles.scoped_keys]]\npath = \"/k/a.pub\"\nscope = \"all\"\n").unwrap_err();
        let at = e.at().unwrap();
        assert_eq!(at.line, 3, "{e}");
        assert!(e.to_string().contains("apt"), "{e}");
        // An apt key without the archive keyrings its packages must be signed with.
        let e =
            parse("[[bundles.scoped_keys]]\npath = \"/k/a.pub\"\nscope = \"apt\"\n").unwrap_err();
        assert_eq!(e.at().unwrap().line, 3, "{e}");
        assert!(e.to_string().contains("archive_keyrings"), "{e}");
        let e = parse("[[bundles.scoped_keys]]\npath = \"/k/a.pub\"\nscope = \"apt\"\narchive_keyrings = [\"k.gpg\"]\n").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn errors_name_their_line_and_dotted_key() {
        let cases = [
            ("state_dir = 5\n", 1, "state_dir"),
            ("[network]\nbridge = \"b\"\nbogus = 1\n", 3, "network.bogus"),
            ("[network]\nbridge = \"b\"\n[network]\n", 3, "network"),
            ("[[monitor.feeds]]\nname = 3\n", 2, "monitor.feeds.name"),
        ];
        for (text, line, key) in cases {
            let err = parse(text).unwrap_err();
            let at = err.at().unwrap_or_else(|| panic!("{text:?}: {err}"));
            assert_eq!((at.line, at.key), (line, key), "{text:?}: {err}");
            assert_eq!(at.path, Path::new("/etc/po.toml"));
        }
        let err = parse(&GOOD.replace("cpu_share = 50", "cpu_share = 500")).unwrap_err();
        assert!(err.at().unwrap().key.ends_with(".cpu_share"), "{err}");
        let missing = Config::load(Path::new("/nonexistent/po.toml"), &HostFacts::probe());
        assert!(missing.unwrap_err().at().is_none());
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("[[lc]\nid = 1").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 1, .. }), "{err}");
    }

    /// Issue 18: typos in `[service]`, `[monitor]`, `[yara]` (and every other section) passed
    /// silently; now they are errors at their line.
    #[test]
    fn unknown_keys_in_every_section_are_refused_at_their_line() {
        let lines = GOOD.lines().count();
        for (section, key) in [
            ("[service]\nprot = 80\n", "prot"),
            ("[monitor]\nintervall = 80\n", "intervall"),
            ("[yara]\nrulez = \"/x\"\n", "rulez"),
            ("[bundles]\ntrusted = []\n", "trusted"),
            ("[daemon]\nlisen = \"127.0.0.1:1\"\n", "lisen"),
            ("[monitor.smtp]\nhost = \"h\"\nprot = 25\n", "prot"),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"http://x/i\"\ntrusted_keys = [\"/k\"]\nkeys = 1\n",
                "keys",
            ),
        ] {
            let err = parse(&format!("{GOOD}{section}")).unwrap_err();
            let want_line = lines + section.lines().count();
            match &err {
                ConfigError::Syntax { line, message, .. } => {
                    assert_eq!(*line, want_line, "{section}: {err}");
                    assert!(message.contains(&format!("unknown field `{key}`")), "{err}");
                }
                other => panic!("{section}: expected a syntax error, got {other}"),
            }
            assert!(
                err.to_string()
                    .starts_with(&format!("/etc/po.toml:{want_line}:"))
            );
        }
    }

    pub(crate) fn invalid_section(section: &str) -> (usize, String, String) {
        let (line, key, msg) = invalid(&format!("{GOOD}{section}"));
        (line - GOOD.lines().count(), key, msg)
    }

    #[test]
    fn sections_are_checked_beyond_their_types() {
        for (section, at, want_key, want) in [
            (
                "[yara]\nrules = \"rules\"\n",
                2,
                "yara.rules",
                "absolute path",
            ),
            (
                "[bundles]\ntrusted_keys = [\"a.pub\"]\n",
                2,
                "bundles.trusted_keys",
                "absolute path",
            ),
            (
                "[bundles]\nmax_bundle_mib = 0\n",
                2,
                "bundles.max_bundle_mib",
                "1 to 65536",
            ),
            (
                "[monitor]\ninterval_secs = 0\n",
                2,
                "monitor.interval_secs",
                "1 to 604800",
            ),
            (
                "[monitor]\nadmins = [\"nobody\"]\n",
                2,
                "monitor.admins",
                "not a mail address",
            ),
            (
                "[monitor]\nsecret_file = \"rel\"\n",
                2,
                "monitor.secret_file",
                "absolute",
            ),
            (
                "[monitor]\nallowed_hosts = [\"http://x\"]\n",
                2,
                "monitor.allowed_hosts",
                "no scheme",
            ),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"ftp://x/i.json\"\ntrusted_keys = [\"/k\"]\n",
                3,
                "monitor.feeds[0].url",
                "only http",
            ),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"http://x/i.json\"\ntrusted_keys = []\n",
                4,
                "monitor.feeds[0].trusted_keys",
                "at least one",
            ),
            (
                "[[monitor.feeds]]\nname = \"a b\"\nurl = \"http://x/i.json\"\ntrusted_keys = [\"/k\"]\n",
                2,
                "monitor.feeds[0].name",
                "use 1-64",
            ),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"https://x/i.json\"\ntrusted_keys = [\"/k\"]\nca_file = \"ca.pem\"\n",
                5,
                "monitor.feeds[0].ca_file",
                "absolute",
            ),
            (
                "[[bundles.scoped_keys]]\npath = \"apt.pub\"\nscope = \"apt\"\n",
                2,
                "bundles.scoped_keys[0].path",
                "absolute path",
            ),
            (
                "[bundles]\ntrusted_keys = [\"/k/apt.pub\"]\n[[bundles.scoped_keys]]\npath = \"/k/apt.pub\"\nscope = \"apt\"\n",
                4,
                "bundles.scoped_keys[0].path",
                "list it in one place",
            ),
            (
                "[[monitor.feeds]]\nname = \"deb\"\nkind = \"apt\"\n",
                2,
                "monitor.feeds[0].signing_key",
                "needs signing_key",
            ),
            (
                "[[monitor.feeds]]\nname = \"deb\"\nkind = \"apt\"\nsigning_key = \"/k/apt.key\"\nurl = \"http://x/i.json\"\n",
                5,
                "monitor.feeds[0].url",
                "an apt feed has no index",
            ),
            (
                "[[monitor.feeds]]\nname = \"deb\"\nkind = \"apt\"\nsigning_key = \"apt.key\"\n",
                4,
                "monitor.feeds[0].signing_key",
                "absolute",
            ),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"http://x/i.json\"\ntrusted_keys = [\"/k\"]\nsigning_key = \"/k/apt.key\"\n",
                5,
                "monitor.feeds[0].signing_key",
                "only an apt feed",
            ),
            (
                "[[monitor.feeds]]\nname = \"deb\"\nkind = \"apt\"\nsigning_key = \"/k/apt.key\"\nlcs = [\"lc1\", \"lc9\"]\n",
                5,
                "monitor.feeds[0].lcs",
                "\"lc9\" is not an LC of this config",
            ),
            (
                "[[monitor.feeds]]\nname = \"a\"\nurl = \"http://x/i.json\"\ntrusted_keys = [\"/k\"]\nlcs = []\n",
                5,
                "monitor.feeds[0].lcs",
                "only an apt feed",
            ),
            (
                "[monitor.smtp]\nhost = \"h\"\nusername = \"u\"\n",
                3,
                "monitor.smtp.username",
                "both username and password_file",
            ),
            (
                "[daemon]\ntokens = [\"x\"]\n",
                2,
                "daemon.tokens",
                "sha256:<64 hex digits>",
            ),
            (
                "[daemon]\nlisten = \"127.0.0.1:1\"\n",
                2,
                "daemon.listen",
                "needs at least one bearer token",
            ),
        ] {
            let (line, key, msg) = invalid_section(section);
            assert_eq!((line, key.as_str()), (at, want_key), "{section}: {msg}");
            assert!(msg.contains(want), "{section}: {msg}");
        }
        // A mode the syntax cannot express is refused too.
        let err = parse(&format!(
            "{GOOD}[monitor.smtp]\nhost = \"h\"\ntls = \"ssl\"\n"
        ))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn daemon_tls_pairs_and_plaintext_tcp() {
        let h = format!("sha256:{}", "ab".repeat(32));
        let daemon = |rest: &str| format!("{GOOD}[daemon]\ntokens = [\"{h}\"]\n{rest}");
        let (_, key, msg) = invalid(&daemon("tls_cert = \"/c.pem\"\n"));
        assert_eq!(key, "daemon.tls_cert");
        assert!(msg.contains("`tls_cert` is set without `tls_key`"), "{msg}");
        let (_, key, _) = invalid(&daemon("tls_key = \"/k.pem\"\n"));
        assert_eq!(key, "daemon.tls_key");
        for addr in ["0.0.0.0:7878", "192.0.2.1:7878", "[::]:7878"] {
            let (_, key, msg) = invalid(&daemon(&format!("listen = \"{addr}\"\n")));
            assert_eq!(key, "daemon.listen");
            assert!(
                msg.contains("in clear") && msg.contains("allow_plaintext_tcp"),
                "{msg}"
            );
        }
        let c = parse(&daemon(
            "listen = \"0.0.0.0:7878\"\nallow_plaintext_tcp = true\n",
        ))
        .unwrap();
        assert!(c.daemon.allow_plaintext_tcp && c.daemon.tls.is_none());
        assert_eq!(c.daemon.tokens, [[0xab; 32]]);
        let c = parse(&daemon(
            "listen = \"0.0.0.0:7878\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nmonitor = false\n",
        ))
        .unwrap();
        assert_eq!(c.daemon.tls.unwrap().key, PathBuf::from("/k.pem"));
        assert!(!c.daemon.monitor);
    }

    #[test]
    fn daemon_connection_limits_are_checked() {
        let c = parse(&format!(
            "{GOOD}[daemon]\nmax_connections = 8\nidle_timeout_secs = 5\n"
        ))
        .unwrap();
        assert_eq!(c.daemon.max_connections, 8);
        assert_eq!(c.daemon.idle_timeout.as_secs(), 5);
        let d = parse(GOOD).unwrap().daemon;
        assert_eq!((d.max_connections, d.idle_timeout.as_secs()), (256, 60));
        for (rest, want_key) in [
            ("max_connections = 0\n", "daemon.max_connections"),
            ("max_connections = 70000\n", "daemon.max_connections"),
            ("idle_timeout_secs = 0\n", "daemon.idle_timeout_secs"),
        ] {
            let (line, key, msg) = invalid(&format!("{GOOD}[daemon]\n{rest}"));
            assert_eq!(key, want_key, "{rest}: {msg}");
            assert!(line > 0 && msg.contains("must be 1 to"), "{rest}: {msg}");
        }
    }

    #[test]
    fn sections_parse_into_typed_values_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.service, ServiceSettings::default());
        assert_eq!(c.bundles, BundlesSection::default());
        assert_eq!(c.monitor, None);
        assert_eq!(c.yara, None);
        assert_eq!(c.daemon, DaemonSection::defaults(Path::new("/tmp/po/run")));
        assert_eq!(
            c.daemon.socket,
            PathBuf::from("/tmp/po/run/daemon/patchover.sock")
        );
        let err = c.monitor().unwrap_err().to_string();
        assert!(
            err.contains("[monitor]") && err.contains("docs/monitor.md"),
            "{err}"
        );

        let c = parse(&format!(
            r#"{GOOD}
[service]
port = 8080
restart = ["/etc/init.d/S50app", "restart"]
health = {{ kind = "http", path = "/health" }}

[bundles]
trusted_keys = ["/k/a.pub"]
max_bundle_mib = 8

[yara]
rules = "/etc/patchover/yara"

[monitor]
interval_secs = 60
admins = ["Admin@Example.org"]
[[monitor.feeds]]
name = "main"
url = "http://127.0.0.1:8080/index.json"
trusted_keys = ["/k/feed.pub"]
[monitor.imap]
host = "127.0.0.1"
username = "po"
password_file = "/etc/po/imap.pw"
"#
        ))
        .unwrap();
        assert_eq!(c.service.port, 8080);
        assert_eq!(c.service.restart, ["/etc/init.d/S50app", "restart"]);
        assert!(
            matches!(&c.service.health, Some(HealthProbe::Http { path, .. }) if path == "/health")
        );
        assert_eq!(c.bundles.trusted_keys, [PathBuf::from("/k/a.pub")]);
        assert_eq!(c.bundles.max_bundle_bytes, Some(8 << 20));
        assert_eq!(c.yara.unwrap().rules, PathBuf::from("/etc/patchover/yara"));
        let m = c.monitor.unwrap();
        assert_eq!(m.interval, std::time::Duration::from_secs(60));
        assert_eq!(m.admins, ["admin@example.org"]);
        assert_eq!(m.feeds[0].name, "main");
        let imap = m.imap.unwrap();
        assert_eq!((imap.port, imap.mailbox.as_str()), (993, "INBOX"));
    }

    #[test]
    fn service_address_is_required_where_a_mode_needs_it() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.service_address().unwrap().to_string(), "10.77.0.10/24");
        let c = parse(&GOOD.replace("service_address = \"10.77.0.10/24\"\n", "")).unwrap();
        let err = c.service_address().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Missing {
                what: "network.service_address",
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("/etc/po.toml: network.service_address is not set"),
            "{err}"
        );
    }

    #[test]
    fn missing_file() {
        let err = Config::load(Path::new("/nonexistent/po.toml"), &HOST).unwrap_err();
        assert!(err.to_string().contains("--config PATH"), "{err}");
    }
}
