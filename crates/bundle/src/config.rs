//! The `[bundles]` section of the patchover config.
//!
//! The core config keeps sections it does not know as raw TOML (`Config.extra`); this crate
//! owns `[bundles]` and validates it here, with the same strictness as the rest of the config:
//! unknown keys are errors, key paths must be absolute.
//!
//! ```toml
//! [bundles]
//! trusted_keys = ["/etc/patchover/keys/release.pub"]
//! max_bundle_mib = 256      # optional
//! max_unpacked_mib = 1024   # optional
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::archive::Limits;
use crate::keys::{KeyError, TrustedKeys};

/// The section name in the config.
pub const SECTION: &str = "bundles";

/// A `[bundles]` section that is not valid.
#[derive(Debug, thiserror::Error)]
pub enum BundlesConfigError {
    #[error("config [bundles] is not valid")]
    Toml(#[source] toml::de::Error),
    #[error("config [bundles] {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("config [bundles] trusted_keys")]
    Keys(#[source] KeyError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    trusted_keys: Vec<PathBuf>,
    max_bundle_mib: Option<u64>,
    max_unpacked_mib: Option<u64>,
}

/// The validated `[bundles]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BundlesConfig {
    /// Public key files (minisign format) whose signatures are trusted.
    pub trusted_keys: Vec<PathBuf>,
    pub limits: Limits,
}

impl BundlesConfig {
    /// Reads the section from the config's `extra` map; a missing section is the default
    /// (no trusted keys, default limits).
    pub fn from_extra(extra: &BTreeMap<String, toml::Value>) -> Result<Self, BundlesConfigError> {
        match extra.get(SECTION) {
            None => Ok(BundlesConfig::default()),
            Some(v) => BundlesConfig::from_value(v.clone()),
        }
    }

    pub fn from_value(v: toml::Value) -> Result<Self, BundlesConfigError> {
        let raw: Raw = v.try_into().map_err(BundlesConfigError::Toml)?;
        for p in &raw.trusted_keys {
            if !p.is_absolute() {
                return Err(BundlesConfigError::Invalid {
                    key: "trusted_keys",
                    message: format!("{} must be an absolute path", p.display()),
                });
            }
        }
        let mut limits = Limits::default();
        let mib = |key: &'static str, v: u64| {
            if v == 0 || v > 64 * 1024 {
                Err(BundlesConfigError::Invalid {
                    key,
                    message: format!("{v} must be 1 to 65536"),
                })
            } else {
                Ok(v << 20)
            }
        };
        if let Some(v) = raw.max_bundle_mib {
            limits.max_bundle_bytes = mib("max_bundle_mib", v)?;
        }
        if let Some(v) = raw.max_unpacked_mib {
            limits.max_unpacked_bytes = mib("max_unpacked_mib", v)?;
        }
        Ok(BundlesConfig {
            trusted_keys: raw.trusted_keys,
            limits,
        })
    }

    /// Loads the trusted public keys the section lists.
    pub fn load_trusted_keys(&self) -> Result<TrustedKeys, BundlesConfigError> {
        TrustedKeys::from_files(&self.trusted_keys).map_err(BundlesConfigError::Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BundlesConfig, BundlesConfigError> {
        let v: toml::Table = toml::from_str(s).unwrap();
        let extra: BTreeMap<String, toml::Value> = v.into_iter().collect();
        BundlesConfig::from_extra(&extra)
    }

    #[test]
    fn section_parses_and_validates() {
        assert_eq!(parse("").unwrap(), BundlesConfig::default());
        let c = parse("[bundles]\ntrusted_keys = [\"/k/a.pub\"]\nmax_bundle_mib = 8\n").unwrap();
        assert_eq!(c.trusted_keys, [PathBuf::from("/k/a.pub")]);
        assert_eq!(c.limits.max_bundle_bytes, 8 << 20);
        assert!(matches!(
            parse("[bundles]\ntrusted_keys = [\"a.pub\"]\n"),
            Err(BundlesConfigError::Invalid {
                key: "trusted_keys",
                ..
            })
        ));
        assert!(matches!(
            parse("[bundles]\ntrusted = []\n"),
            Err(BundlesConfigError::Toml(_))
        ));
        assert!(matches!(
            parse("[bundles]\nmax_bundle_mib = 0\n"),
            Err(BundlesConfigError::Invalid { .. })
        ));
        let missing = parse("[bundles]\ntrusted_keys = [\"/nonexistent/k.pub\"]\n").unwrap();
        assert!(matches!(
            missing.load_trusted_keys(),
            Err(BundlesConfigError::Keys(_))
        ));
    }
}
