//! The world of a real-service demo (`patchover demo --service nginx`, and the next services
//! beside it): two Debian `ns` LCs on a bridge of their own, the service as Debian packages it
//! (`image build-debian`, cached), the config's `[service]` from the service's [`Profile`], the
//! LC's real pending updates made into a signed bundle (`bundle from-apt`), and a client host.
//!
//! Every name on the host (bridge, /24, client namespace and veth, LC ids, cgroup parent) is
//! made from the process id, so a real-service demo never meets the busybox demo (`podemo0`,
//! `10.77.250.x`, `lc1`/`lc2`), a test, or another demo. The names are written into the demo's
//! directory, so the next run there tears down what a killed run left.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patchover_bundle::create::sign_bundle;
use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_debian::fromapt::{FromAptOptions, Outcome, Update};
use patchover_debian::sources::Source;
use patchover_lc::LcBackend;
use patchover_net::Mode;
use serde::{Deserialize, Serialize};

use crate::demo::{Net, add_client, nic_line, remove_net};
use crate::{Context, ShowcaseError};

/// What a real service needs from its demo: the packages, its `[service]`, the updates to take.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// `--service NAME`.
    pub name: &'static str,
    /// The image's Debian packages (`build-debian --packages`).
    pub image_packages: &'static [&'static str],
    /// The packages whose pending updates are bundled (and what their updates need); all
    /// pending updates with `--all-updates`.
    pub update_packages: &'static [&'static str],
    /// The config's `[service]` section, as docs/services.md shows it.
    pub service: &'static str,
    pub port: u16,
    /// The path the load clients GET.
    pub load_path: &'static str,
    /// The switch mode when `--mode` is not given.
    pub default_mode: Mode,
}

/// How to make the world.
#[derive(Debug, Clone)]
pub struct WorldOptions {
    pub mode: Mode,
    /// Where the updates come from (`from-apt --source`); empty: the host's apt sources.
    pub sources: Vec<Source>,
    /// Every pending update of the LC, not only the profile's packages.
    pub all_updates: bool,
}

/// The host's names of one world (kept in `DIR/world.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Names {
    pub net: Net,
    /// The active LC first.
    pub lcs: [String; 2],
    pub cgroup_parent: String,
}

impl Names {
    /// This process's names.
    pub fn of_this_process() -> Names {
        let pid = std::process::id();
        let tag = format!("{:05x}", pid & 0xf_ffff);
        let octet = pid % 250 + 1;
        Names {
            net: Net {
                bridge: format!("ponx{tag}"),
                net: format!("10.79.{octet}"),
                client_net: format!("10.80.{octet}"),
                client_veth: format!("poncx{tag}"),
                client_ns: format!("ponx-c-{tag}"),
            },
            lcs: [format!("nx{tag}a"), format!("nx{tag}b")],
            cgroup_parent: format!("patchover-nx-{tag}"),
        }
    }
}

/// The bundle made of the pending updates.
#[derive(Debug, Clone, Serialize)]
pub struct BundleMade {
    pub id: String,
    pub title: String,
    pub category: String,
    pub severity: String,
    pub bytes: u64,
    pub updates: Vec<Update>,
}

/// A world, ready: the active LC serves, the bundle is imported and marked.
#[derive(Debug, Clone)]
pub struct World {
    pub dir: PathBuf,
    pub names: Names,
    pub config_path: PathBuf,
    /// The LCs' system disks (directories), in the order of `names.lcs`.
    pub sys: [PathBuf; 2],
    /// The client's network namespace.
    pub netns: PathBuf,
    pub service: SocketAddr,
    pub bundle: BundleMade,
    /// Seconds: image (build or cache + copy), from-apt, boot to the service answering.
    pub timings: BTreeMap<&'static str, f64>,
}

impl World {
    /// The active LC's id (the one every patch starts from).
    pub fn active(&self) -> &str {
        &self.names.lcs[0]
    }

    /// The packages of the bundle: the installed version of each on LC `i` (0 or 1), read from
    /// its dpkg status through its confined root (a package the LC does not have is left out).
    pub fn packages(&self, i: usize) -> Result<BTreeMap<String, String>, ShowcaseError> {
        let names: Vec<&str> = self
            .bundle
            .updates
            .iter()
            .map(|u| u.package.as_str())
            .collect();
        installed(&self.sys[i], &self.names.lcs[i], &names)
    }
}

/// The versions of `packages` installed on the LC whose system disk is `sys`.
pub fn installed(
    sys: &Path,
    lc: &str,
    packages: &[&str],
) -> Result<BTreeMap<String, String>, ShowcaseError> {
    let root = patchover_lcroot::LcRoot::open(sys)
        .with_context(|| format!("opening {lc}'s system disk"))?;
    let status = patchover_debian::status::DpkgStatus::read(
        &patchover_debian::reader::RootReader::new(&root, lc, false),
    )
    .with_context(|| format!("reading {lc}'s dpkg status"))?;
    Ok(packages
        .iter()
        .filter_map(|p| {
            let i = status.installed.get(*p)?;
            Some((i.package.clone(), i.version.clone()))
        })
        .collect())
}

/// Builds the world in `dir` (wiped first, after tearing down what a run there left).
pub fn prepare(
    dir: &Path,
    profile: &Profile,
    o: &WorldOptions,
    say: &dyn Fn(&str),
) -> Result<World, ShowcaseError> {
    teardown(dir);
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let names = Names::of_this_process();
    fs::write(dir.join("world.json"), serde_json::to_vec(&names)?)?;
    let (pubkey, seckey) = (dir.join("release.pub"), dir.join("release.key"));
    generate_keypair(&pubkey, &seckey, None).context("making the signing key")?;
    let sys = [dir.join("lc-a-sys"), dir.join("lc-b-sys")];
    let config_path = write_config(dir, profile, o.mode, &names, &pubkey, &sys)?;
    let mut timings = BTreeMap::new();

    say(&format!(
        "building the Debian image ({}; cached after the first run)",
        profile.image_packages.join(", ")
    ));
    let t = Instant::now();
    build_image(profile, &sys[0])?;
    fs::create_dir_all(&sys[1])?;
    timings.insert("image_s", t.elapsed().as_secs_f64());

    say("asking the archive for the LC's pending updates (bundle from-apt)");
    let t = Instant::now();
    let bundle = bundle_updates(dir, profile, o, &names.lcs[0], &sys[0], &seckey)?;
    timings.insert("from_apt_s", t.elapsed().as_secs_f64());
    {
        let mut env = crate::env(&config_path)?;
        let config = env.config.clone();
        patchover_app::patches::import(
            &config,
            &mut env.store,
            &dir.join("updates.tar.zst"),
            true,
        )?;
    }

    say(&format!(
        "booting {} and giving it the service",
        names.lcs[0]
    ));
    let t = Instant::now();
    boot_active(&config_path, &names.lcs[0], o.mode)?;
    let netns = add_client(&names.net, o.mode)?;
    let service = names.net.service(profile.port)?;
    wait_serving(&netns, service, profile.load_path)?;
    timings.insert("boot_to_serving_s", t.elapsed().as_secs_f64());
    Ok(World {
        dir: dir.to_owned(),
        names,
        config_path,
        sys,
        netns,
        service,
        bundle,
        timings,
    })
}

pub(crate) fn write_config(
    dir: &Path,
    profile: &Profile,
    mode: Mode,
    names: &Names,
    pubkey: &Path,
    sys: &[PathBuf; 2],
) -> Result<PathBuf, ShowcaseError> {
    let lc = |i: usize| {
        format!(
            "[[lc]]\nid = \"{id}\"\ncpu = {i}\ncpu_share = 50\nmemory_mib = 512\nsystem_disk = {{ path = \"{sys}\" }}\nnic = [{nic}]\n",
            id = names.lcs[i],
            sys = sys[i].display(),
            nic = nic_line(&names.net, mode, i as u8 + 1),
        )
    };
    let text = format!(
        "# Written by `patchover demo --service {svc}`.\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\ncgroup_parent = \"{cg}\"\n\n{network}\n[bundles]\ntrusted_keys = [\"{pk}\"]\n\n{service}\n{a}\n{b}",
        svc = profile.name,
        d = dir.display(),
        cg = names.cgroup_parent,
        network = names.net.config_section(),
        pk = pubkey.display(),
        service = profile.service,
        a = lc(0),
        b = lc(1),
    );
    let path = dir.join("patchover.toml");
    fs::write(&path, text)?;
    Ok(path)
}

/// `build-debian` into `sys` (from `PATCHOVER_DEBIAN_CACHE` when built before).
fn build_image(profile: &Profile, sys: &Path) -> Result<(), ShowcaseError> {
    use patchover_debian::image::{BuildOptions, build_debian};
    let agent = patchover_image::guest_binary("patchover-agent")?;
    let packages = profile
        .image_packages
        .iter()
        .map(|p| p.to_string())
        .collect();
    let opts = BuildOptions::from_host("bookworm", packages, false, agent)
        .context("reading the host's apt sources")?;
    build_debian(sys, &opts).context("building the Debian image")?;
    Ok(())
}

/// `bundle from-apt` on the active LC's disk, then `bundle sign`: `DIR/updates.tar.zst`.
fn bundle_updates(
    dir: &Path,
    profile: &Profile,
    o: &WorldOptions,
    lc: &str,
    sys: &Path,
    seckey: &Path,
) -> Result<BundleMade, ShowcaseError> {
    let output = dir.join("updates.tar.zst");
    let opts = FromAptOptions {
        lc: lc.to_owned(),
        sources: o.sources.clone(),
        security_only: false,
        packages: match o.all_updates {
            true => Vec::new(),
            false => profile
                .update_packages
                .iter()
                .map(|p| p.to_string())
                .collect(),
        },
        output: output.clone(),
        ..FromAptOptions::default()
    };
    let root = patchover_lcroot::LcRoot::open(sys)
        .with_context(|| format!("opening {lc}'s system disk"))?;
    let made = patchover_debian::fromapt::from_apt(&root, &opts).context("bundle from-apt")?;
    let bundle = match made {
        Outcome::Written {
            id,
            category,
            severity,
            title,
            updates,
            bytes,
            ..
        } => BundleMade {
            id,
            title,
            category,
            severity,
            bytes,
            updates,
        },
        nothing => bail!(
            "the archive has no update for {lc}'s packages ({nothing}): nothing to patch. Try --all-updates, or an archive with updates (--source)"
        ),
    };
    sign_bundle(&output, &SigningKey::from_file(seckey, None)?).context("signing the bundle")?;
    Ok(bundle)
}

/// Boots the active LC and puts the service in front of it for `mode`.
fn boot_active(config_path: &Path, lc: &str, mode: Mode) -> Result<(), ShowcaseError> {
    {
        let env = crate::env(config_path)?;
        let spec = env.lc(lc)?.clone();
        env.backend.boot(&spec)?;
        env.backend.wait_agent(&spec, Duration::from_secs(30))?;
    }
    match mode {
        Mode::Path => {}
        Mode::Readdress => {
            patchover_app::service::assign(&mut crate::env(config_path)?, lc)?;
        }
        Mode::Seamless => {
            patchover_app::service::seamless_setup(&mut crate::env(config_path)?, lc)?;
        }
    }
    Ok(())
}

/// Waits (30 s at most) until the service answers `GET path` with 200 from the client host.
fn wait_serving(netns: &Path, service: SocketAddr, path: &str) -> Result<(), ShowcaseError> {
    let path = path.to_owned();
    let last = patchover_net::netns::in_netns(Some(netns), move || {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let r = crate::demo::request(service, "GET", &path, b"", Duration::from_secs(2));
            if matches!(r, Ok((200, _))) || Instant::now() > until {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })?;
    match last {
        Ok((200, _)) => Ok(()),
        other => bail!("the service never answered GET http://{service}/ with 200: {other:?}"),
    }
}

/// Stops the LCs and removes the network a run in `dir` made (from its `world.json`);
/// what is not there is passed over.
pub fn teardown(dir: &Path) {
    let Ok(text) = fs::read(dir.join("world.json")) else {
        return;
    };
    let Ok(names) = serde_json::from_slice::<Names>(&text) else {
        return;
    };
    let cfg = dir.join("patchover.toml");
    if let Ok(exe) = std::env::current_exe() {
        for lc in &names.lcs {
            let _ = Command::new(&exe)
                .env("PATCHOVER_CONFIG", &cfg)
                .args(["lc", "stop", lc])
                .output();
        }
    }
    remove_net(&names.net);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names fit the kernel's 15 bytes for interfaces and the LC id rule, and never are
    /// the busybox demo's.
    #[test]
    fn names_are_this_processs_and_fit() {
        let n = Names::of_this_process();
        for ifname in [&n.net.bridge, &n.net.client_veth] {
            assert!(ifname.len() <= 15, "{ifname}");
        }
        for lc in &n.lcs {
            let id: patchover_core::LcId = lc.parse().unwrap();
            assert!(patchover_lc::host_port_name(&id, 9).len() <= 15, "{lc}");
        }
        assert_ne!(n.net.bridge, crate::demo::BRIDGE);
        assert!(n.net.net.starts_with("10.79.") && n.net.client_net.starts_with("10.80."));
        assert!(!n.lcs.contains(&"lc1".to_owned()));
    }
}
