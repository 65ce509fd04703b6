//! One file per CLI verb group.

pub mod approval;
pub mod bench;
pub mod bench_copy;
pub mod bench_copy_image;
pub mod bench_copy_qemu;
pub mod bench_cycle;
pub mod bench_feed;
pub mod bench_soak;
pub mod bench_switch;
pub mod bundle;
pub mod demo;
pub mod disk;
pub mod feed;
pub mod image;
pub mod image_qemu;
pub mod internal;
pub mod lc;
pub mod load;
pub mod monitor;
pub mod net;
pub mod patch;
pub mod patches;
pub mod remote;
pub mod serve;

use std::path::PathBuf;

use anyhow::Context;
use patchover_core::{Config, HostFacts};

/// The global flags, handed to every verb.
#[derive(Clone)]
pub struct Ctx {
    pub config_path: PathBuf,
    pub json: bool,
    /// Print nothing on success (a verb called by another verb).
    pub quiet: bool,
    /// Act in this process even when a daemon answers on its socket (see [`remote`]).
    pub direct: bool,
}

impl Ctx {
    /// Loads and validates the config. Verbs that do not need one never call this.
    pub fn config(&self) -> anyhow::Result<Config> {
        Config::load(&self.config_path, &HostFacts::probe()).context("config")
    }
}

/// An error caused by what the user asked for (exit code 2), not by the host.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Bad input naming something that does not exist (an LC, a patch): exit code 2, and 404
/// through the API.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// What most verbs need: the config, the store mirroring it, and the LC backend.
pub struct Env {
    pub config: Config,
    pub store: patchover_store::Store,
    /// Every LC backend; each call goes to the one the LC's spec names.
    pub backend: patchover_lc::dispatch::ByKind,
}

impl Env {
    pub fn open(ctx: &Ctx) -> anyhow::Result<Env> {
        let config = ctx.config()?;
        let mut store = patchover_store::Store::open(&config.store_path())?;
        // Writes only when the config's LCs changed since the last sync.
        store.sync_lcs(&config.lcs)?;
        let exe = std::env::current_exe().context("cannot find the patchover binary")?;
        let backend = patchover_lc::dispatch::ByKind {
            ns: Box::new(
                patchover_lc::ns::NsBackend::new(
                    patchover_lc::host::LinuxHost::new(exe.clone()),
                    patchover_lc::ns::NsConfig::from_config(&config),
                )
                .with_images(std::sync::Arc::new(
                    patchover_qemu::nsdisks::NsImageServer::new(&config.run_dir),
                )),
            ),
            qemu: Some(Box::new(patchover_qemu::backend::QemuBackend::new(
                patchover_lc::host::LinuxHost::new(exe),
                patchover_qemu::backend::QemuConfig::from_config(&config),
            ))),
        };
        Ok(Env {
            config,
            store,
            backend,
        })
    }

    /// The LC named `id`, or a bad-input error listing the ones the config has.
    pub fn lc(&self, id: &str) -> anyhow::Result<&patchover_core::LcSpec> {
        let spec = self.config.lc(id).ok_or_else(|| {
            let known: Vec<String> = self.config.lcs.iter().map(|l| l.id.to_string()).collect();
            NotFound(format!(
                "unknown LC {id:?}; {} defines: {}",
                self.config.path.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        Ok(spec)
    }
}

/// Renders an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}
