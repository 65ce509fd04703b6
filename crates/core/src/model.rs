//! Logical computers and patches as plain data.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest LC id. Host-side interface names are built from it (`po<id>n<index>`) and Linux
/// allows 15 bytes for those.
pub const LC_ID_MAX: usize = 8;

/// The name of a logical computer: 1–8 of `a-z 0-9 -`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LcId(String);

impl LcId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LcId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let starts_alpha = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if s.is_empty() || s.len() > LC_ID_MAX || !ok_chars || !starts_alpha {
            return Err(format!(
                "invalid LC id {s:?}: use 1-{LC_ID_MAX} characters of a-z, 0-9 and '-', starting with a letter"
            ));
        }
        Ok(LcId(s.to_owned()))
    }
}

impl TryFrom<String> for LcId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LcId> for String {
    fn from(id: LcId) -> String {
        id.0
    }
}

impl fmt::Display for LcId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which partitioning mechanism runs an LC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Linux namespaces and cgroups (software partitioning).
    #[default]
    Ns,
    /// A QEMU virtual machine.
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Ns => "ns",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// A disk is a directory tree or an image file holding a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Dir,
    Image,
}

impl DiskKind {
    /// The kind a path names when the config does not say: `.img`, `.raw` and `.qcow2` files
    /// are images, anything else a directory.
    pub fn of_path(path: &std::path::Path) -> DiskKind {
        if path
            .extension()
            .is_some_and(|e| e == "img" || e == "raw" || e == "qcow2")
        {
            DiskKind::Image
        } else {
            DiskKind::Dir
        }
    }
}

/// What a disk is for (seed fig. 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    /// The OS and programs; becomes the LC's root.
    System,
    /// The service's data; mounted at its configured path.
    Application,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub role: DiskRole,
    pub path: PathBuf,
    pub kind: DiskKind,
    /// Where the disk appears inside the LC (`/` for the system disk).
    pub mount: PathBuf,
}

/// A MAC address, `02:..` style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast address derived from a name.
    pub fn derive(name: &str) -> MacAddr {
        // FNV-1a: stable across runs and releases, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("invalid MAC address {s:?}: write six hex bytes like 02:00:00:00:00:01");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if m[0] & 1 == 1 {
            return Err(format!(
                "invalid MAC address {s:?}: it is a multicast address"
            ));
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 address with its prefix length, `10.77.0.10/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("invalid address {s:?}: write an IPv4 address with prefix, like 10.77.0.10/24")
        };
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A network interface of an LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The name inside the LC, e.g. `eth0`.
    pub name: String,
    pub mac: MacAddr,
    pub address: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Addr>,
    /// Boot with the host end off the bridge (a standby that shares the active LC's MAC and
    /// address in `path` mode must not be on the bridge until the switch).
    #[serde(default)]
    pub detached: bool,
}

/// The longest interface name Linux takes (`IFNAMSIZ` - 1).
pub const IFACE_NAME_MAX: usize = 15;

/// Checks a network interface name (a NIC inside an LC, the host bridge): 1-15 of
/// `a-z 0-9 _ -`, not starting with `-`. Such names reach the `ip` command inside an LC and a
/// guest's shell scripts: nothing in them can be taken as shell syntax, a path, an option or
/// two words. Checked where a name enters: the config loader and `lc attach-nic` (CLI, REST).
pub fn check_iface_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > IFACE_NAME_MAX || !ok_chars || name.starts_with('-') {
        return Err(format!(
            "invalid interface name {name:?}: use 1-{IFACE_NAME_MAX} characters of a-z, 0-9, '_' and '-', not starting with '-' (like eth1)"
        ));
    }
    Ok(())
}

/// The CPU part of an LC's resources: a share of one host CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAlloc {
    /// The host CPU the LC runs on.
    pub cpu: u32,
    /// Percent of that CPU, 1–100.
    pub share_pct: u32,
}

/// One row of the resource table (seed fig. 5): everything the host gives one LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LcSpec {
    pub id: LcId,
    pub backend: BackendKind,
    pub cpu: CpuAlloc,
    pub memory_mib: u64,
    pub hostname: String,
    /// The program the LC boots, inside its system disk.
    pub init: PathBuf,
    pub system_disk: DiskSpec,
    pub app_disk: Option<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// How a `qemu` LC boots (its kernel lives outside its disks); `None` for `ns`.
    #[serde(default)]
    pub qemu: Option<QemuBoot>,
}

/// The kernel a `qemu` LC boots, and what it is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after what patchover sets.
    #[serde(default)]
    pub append: String,
}

impl LcSpec {
    pub fn disks(&self) -> impl Iterator<Item = &DiskSpec> {
        std::iter::once(&self.system_disk).chain(self.app_disk.iter())
    }

    /// Why `self` cannot stand in for `active` (seed fig. 5: LC3 with half a CPU cannot stand
    /// in for LC1), or `None` when it covers every resource of it.
    pub fn shortfall_against(&self, active: &LcSpec) -> Option<String> {
        let mut lacks = Vec::new();
        if self.cpu.share_pct < active.cpu.share_pct {
            lacks.push(format!(
                "needs {}% of a CPU, has {}%",
                active.cpu.share_pct, self.cpu.share_pct
            ));
        }
        if self.memory_mib < active.memory_mib {
            lacks.push(format!(
                "needs {} MiB memory, has {} MiB",
                active.memory_mib, self.memory_mib
            ));
        }
        if self.nics.len() < active.nics.len() {
            lacks.push(format!(
                "needs {} NICs, has {}",
                active.nics.len(),
                self.nics.len()
            ));
        }
        if active.app_disk.is_some() && self.app_disk.is_none() {
            lacks.push("needs an application disk, has none".to_owned());
        }
        if self.backend != active.backend {
            lacks.push(format!(
                "needs backend {}, is {}",
                active.backend, self.backend
            ));
        }
        (!lacks.is_empty()).then(|| lacks.join("; "))
    }
}

/// The patch table's category columns (seed fig. 6, 602–604).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Security,
    Enhancement,
    Bugfix,
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Category {
    pub fn as_str(&self) -> &'static str {
        match self {
            Category::Security => "security",
            Category::Enhancement => "enhancement",
            Category::Bugfix => "bugfix",
        }
    }
}

impl FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "security" => Ok(Category::Security),
            "enhancement" => Ok(Category::Enhancement),
            "bugfix" => Ok(Category::Bugfix),
            other => Err(format!(
                "unknown category {other:?}: use security, enhancement or bugfix"
            )),
        }
    }
}

/// Name of the marker a disk copy leaves while it is not complete: `<dir>/.patchover-incomplete/`
/// in a directory disk, the sidecar `<image>.patchover-incomplete/` beside an image file. No LC
/// backend uses a disk that carries it (see `patchover_disk::marker`).
pub const INCOMPLETE_MARKER: &str = ".patchover-incomplete";

/// Where the incomplete marker of the disk at `disk` lives (whether or not it exists).
pub fn incomplete_marker(disk: &Path, is_image: bool) -> PathBuf {
    if is_image {
        let mut s = disk.as_os_str().to_owned();
        s.push(INCOMPLETE_MARKER);
        PathBuf::from(s)
    } else {
        disk.join(INCOMPLETE_MARKER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lc_id_rules() {
        assert!("lc1".parse::<LcId>().is_ok());
        assert!("a-b-c-de".parse::<LcId>().is_ok());
        assert!("".parse::<LcId>().is_err());
        assert!("1lc".parse::<LcId>().is_err());
        assert!("LC1".parse::<LcId>().is_err());
        assert!("toolongid".parse::<LcId>().is_err());
        assert!("lc_1".parse::<LcId>().is_err());
    }

    #[test]
    fn mac_round_trip_and_derive() {
        let m: MacAddr = "02:00:0a:4d:00:0a".parse().unwrap();
        assert_eq!(m.to_string(), "02:00:0a:4d:00:0a");
        assert!("01:00:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        let d = MacAddr::derive("lc1/eth0");
        assert_eq!(d, MacAddr::derive("lc1/eth0"));
        assert_ne!(d, MacAddr::derive("lc2/eth0"));
        assert_eq!(d.0[0], 0x02);
    }

    #[test]
    fn cidr_parse() {
        let c: Ipv4Cidr = "10.77.0.10/24".parse().unwrap();
        assert_eq!(c.prefix, 24);
        assert_eq!(c.to_string(), "10.77.0.10/24");
        assert!("10.77.0.10".parse::<Ipv4Cidr>().is_err());
        assert!("10.77.0.10/33".parse::<Ipv4Cidr>().is_err());
    }
}
