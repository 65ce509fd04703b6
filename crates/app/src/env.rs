//! What most operations need: the config, the store mirroring it, and the LC backends.

use patchover_core::{Config, LcSpec};

use crate::AppError;

/// The loaded config, the store mirroring it, and every LC backend.
pub struct Env {
    pub config: Config,
    pub store: patchover_store::Store,
    /// Every LC backend; each call goes to the one the LC's spec names.
    pub backend: patchover_lc::dispatch::ByKind,
}

impl Env {
    /// Opens the store of `config` (syncing its LCs into the resource table) and the
    /// backends, which start helper processes from this executable.
    pub fn open(config: Config) -> Result<Env, AppError> {
        let mut store = patchover_store::Store::open(&config.store_path())?;
        // Writes only when the config's LCs changed since the last sync.
        store.sync_lcs(&config.lcs)?;
        let backend = backends(&config)?;
        Ok(Env {
            config,
            store,
            backend,
        })
    }

    /// The LC named `id`, or a not-found error listing the ones the config has.
    pub fn lc(&self, id: &str) -> Result<&LcSpec, AppError> {
        self.config.lc(id).ok_or_else(|| {
            let known: Vec<String> = self.config.lcs.iter().map(|l| l.id.to_string()).collect();
            AppError::NotFound(format!(
                "unknown LC {id:?}; {} defines: {}",
                self.config.path.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }
}

/// Every LC backend for `config`'s LCs (they start helper processes from this executable).
pub fn backends(config: &Config) -> Result<patchover_lc::dispatch::ByKind, AppError> {
    let exe = std::env::current_exe().map_err(|source| AppError::Io {
        what: "cannot find the patchover binary".to_owned(),
        source,
    })?;
    Ok(patchover_lc::dispatch::ByKind {
        ns: Box::new(
            patchover_lc::ns::NsBackend::new(
                patchover_lc::host::LinuxHost::new(exe.clone()),
                patchover_lc::ns::NsConfig::from_config(config),
            )
            .with_images(std::sync::Arc::new(
                patchover_qemu::nsdisks::NsImageServer::new(&config.run_dir),
            )),
        ),
        qemu: Some(Box::new(patchover_qemu::backend::QemuBackend::new(
            patchover_lc::host::LinuxHost::new(exe),
            patchover_qemu::backend::QemuConfig::from_config(config),
        ))),
    })
}
