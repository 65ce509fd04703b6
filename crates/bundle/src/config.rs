//! The `[bundles]` section of the patchover config.
//!
//! The config loader (`patchover_core::config`) checks the section at load (unknown keys are
//! errors, key paths must be absolute); this turns it into the bundle code's limits and keys.
//!
//! ```toml
//! [bundles]
//! trusted_keys = ["/etc/patchover/keys/release.pub"]
//! max_bundle_mib = 256      # optional
//! max_unpacked_mib = 1024   # optional
//! ```

use std::path::PathBuf;

use patchover_core::config::BundlesSection;

use crate::archive::Limits;
use crate::keys::{KeyError, ScopedKey, TrustedKeys};

/// The section name in the config.
pub const SECTION: &str = "bundles";

/// The trusted keys of a `[bundles]` section cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BundlesConfigError {
    #[error("config [bundles] trusted_keys")]
    Keys(#[source] KeyError),
}

/// The `[bundles]` section as the bundle code uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BundlesConfig {
    /// Public key files (minisign format) whose signatures are trusted.
    pub trusted_keys: Vec<PathBuf>,
    /// Public key files trusted only for their scope's bundles.
    pub scoped_keys: Vec<ScopedKey>,
    pub limits: Limits,
}

impl BundlesConfig {
    /// The section the config loader checked (absolute key paths, limits in range).
    pub fn from_section(section: &BundlesSection) -> BundlesConfig {
        let mut limits = Limits::default();
        if let Some(b) = section.max_bundle_bytes {
            limits.max_bundle_bytes = b;
        }
        if let Some(b) = section.max_unpacked_bytes {
            limits.max_unpacked_bytes = b;
        }
        BundlesConfig {
            trusted_keys: section.trusted_keys.clone(),
            scoped_keys: section.scoped_keys.clone(),
            limits,
        }
    }

    /// Loads the trusted public keys the section lists.
    pub fn load_trusted_keys(&self) -> Result<TrustedKeys, BundlesConfigError> {
        TrustedKeys::from_config(&self.trusted_keys, &self.scoped_keys)
            .map_err(BundlesConfigError::Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_becomes_limits_and_keys() {
        assert_eq!(
            BundlesConfig::from_section(&BundlesSection::default()),
            BundlesConfig::default()
        );
        let c = BundlesConfig::from_section(&BundlesSection {
            trusted_keys: vec![PathBuf::from("/k/a.pub")],
            max_bundle_bytes: Some(8 << 20),
            max_unpacked_bytes: None,
            ..Default::default()
        });
        assert_eq!(c.trusted_keys, [PathBuf::from("/k/a.pub")]);
        assert_eq!(c.limits.max_bundle_bytes, 8 << 20);
        assert_eq!(
            c.limits.max_unpacked_bytes,
            Limits::default().max_unpacked_bytes
        );
        let missing = BundlesConfig::from_section(&BundlesSection {
            trusted_keys: vec![PathBuf::from("/nonexistent/k.pub")],
            ..Default::default()
        });
        assert!(matches!(
            missing.load_trusted_keys(),
            Err(BundlesConfigError::Keys(_))
        ));
    }
}
