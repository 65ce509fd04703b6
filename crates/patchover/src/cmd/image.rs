//! `patchover image build-demo DIR`: a bootable busybox rootfs with the agent and the demo
//! service, or with `--qemu` the same as a QEMU machine. The builders live in
//! `patchover-image`; this is the verb.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_image::{build_demo, guest_binary};
use serde_json::json;

use super::{BadInput, Ctx};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build the demo rootfs (system disk) in DIR, and optionally an empty application disk.
    BuildDemo {
        dir: PathBuf,
        /// Also create this empty directory as the application disk.
        #[arg(long, conflicts_with = "qemu")]
        app_dir: Option<PathBuf>,
        /// Build a QEMU image instead: DIR gets vmlinuz, initrd.img, system.img and app.img.
        #[arg(long)]
        qemu: bool,
        /// The Debian kernel package (linux-image-*-cloud-amd64 .deb) for --qemu, instead of
        /// downloading it with apt.
        #[arg(long, requires = "qemu")]
        kernel_deb: Option<PathBuf>,
        /// The demo service's version string (in /etc/demo/version).
        #[arg(long, default_value = "1.0.0")]
        version: String,
        /// The port the demo service listens on.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Build a Debian rootfs (mmdebstrap, sysvinit, the agent) in DIR: docs/debian.md.
    BuildDebian {
        dir: PathBuf,
        /// Packages to install, comma-separated (their services are enabled).
        #[arg(long, value_delimiter = ',', required = true)]
        packages: Vec<String>,
        /// Also create this empty directory as the application disk.
        #[arg(long)]
        app_dir: Option<PathBuf>,
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Include the suite's -updates and -security (default: the suite as released).
        #[arg(long)]
        with_updates: bool,
        /// Build a QEMU LC instead: DIR gets vmlinuz, initrd.img, system.img and app.img.
        #[arg(long, conflicts_with = "app_dir")]
        qemu: bool,
        /// Replace DIR if it exists.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: ImageCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::BuildDebian {
            dir,
            packages,
            app_dir,
            suite,
            with_updates,
            qemu,
            force,
        } => {
            use patchover_debian::image::{BuildOptions, build_debian, build_debian_qemu};
            let agent = guest_binary("patchover-agent")?;
            let mut opts = BuildOptions::from_host(&suite, packages, with_updates, agent)
                .map_err(|e| BadInput(format!("{:#}", anyhow::Error::from(e))))?;
            opts.force = force;
            let build = if qemu {
                build_debian_qemu
            } else {
                build_debian
            };
            let built = build(&dir, &opts).map_err(|e| match e.is_bad_input() {
                true => anyhow::Error::from(BadInput(e.to_string())),
                false => anyhow::Error::from(e),
            })?;
            if let Some(app) = &app_dir {
                fs::create_dir_all(app).with_context(|| format!("creating {}", app.display()))?;
            }
            match ctx.json {
                true => println!("{}", serde_json::to_string(&built)?),
                false => println!(
                    "Debian {suite} image ({}) in {} ({}, {:.1} s + copy {:.1} s)",
                    built.packages.join(", "),
                    dir.display(),
                    if built.cached {
                        "from the cache"
                    } else {
                        "built"
                    },
                    built.build_secs,
                    built.copy_secs
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::BuildDemo {
            dir,
            qemu: true,
            kernel_deb,
            version,
            port,
            force,
            ..
        } => {
            let img = patchover_image::qemu::build_demo_qemu(
                &dir,
                &version,
                port,
                force,
                kernel_deb.as_deref(),
            )?;
            if ctx.json {
                println!("{}", serde_json::to_string(&img)?);
            } else {
                println!(
                    "QEMU demo image {} (service v{version} on port {port}, kernel {}) built in {}",
                    env!("CARGO_PKG_VERSION"),
                    img.kernel_release,
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::BuildDemo {
            dir,
            app_dir,
            version,
            port,
            force,
            ..
        } => {
            build_demo(&dir, &version, port, force)?;
            if let Some(app) = &app_dir {
                fs::create_dir_all(app)
                    .with_context(|| format!("creating the application disk {}", app.display()))?;
            }
            if ctx.json {
                println!(
                    "{}",
                    json!({"system_disk": dir, "app_disk": app_dir, "version": version, "port": port})
                );
            } else {
                println!(
                    "demo image {} (service v{version} on port {port}) built in {}",
                    env!("CARGO_PKG_VERSION"),
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
