//! `patchover feed publish DIR --key SECKEY [--expires 7d]`: write and sign a feed index for a directory of
//! signed bundles, so any static web server can be a patch server (see docs/monitor.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_bundle::keys::SigningKey;
use patchover_bundle::{Limits, TrustedKey, TrustedKeys};
use patchover_monitor::index::Expiry;

use super::{BadInput, Ctx};

#[derive(Subcommand)]
pub enum FeedCmd {
    /// Write DIR/index.json and DIR/index.json.minisig listing every signed bundle in DIR.
    Publish {
        /// The directory holding the bundles (`*.tar.zst` with their `.minisig`).
        dir: PathBuf,
        /// The minisign secret key that signs the index.
        #[arg(long)]
        key: PathBuf,
        /// The secret key's password, if it is encrypted (or set $PATCHOVER_KEY_PASSWORD).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Public keys the bundles must verify with (default: the index key's own).
        #[arg(long = "bundle-key")]
        bundle_keys: Vec<PathBuf>,
        /// When subscribers stop believing this index: a duration after now (90m, 12h, 7d,
        /// 2w) or an RFC 3339 time. Publish again before then. Without it the index never
        /// expires (format 1).
        #[arg(long)]
        expires: Option<String>,
    },
}

fn password(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the password file {}", f.display()))?;
        return Ok(Some(text.lines().next().unwrap_or("").to_owned()));
    }
    Ok(std::env::var("PATCHOVER_KEY_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty()))
}

pub fn run(cmd: FeedCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        FeedCmd::Publish {
            dir,
            key,
            password_file,
            bundle_keys,
            expires,
        } => {
            let expires = expires
                .map(|e| e.parse::<Expiry>())
                .transpose()
                .map_err(|e| BadInput(e.to_string()))?;
            let pw = password(password_file.as_deref())?;
            let signing = SigningKey::from_file(&key, pw.as_deref())
                .map_err(|e| BadInput(super::monitor::chain(&e)))?;
            let keys = if bundle_keys.is_empty() {
                let text = signing.public_key_text()?;
                TrustedKeys::new(vec![TrustedKey::parse(&text, &key.display().to_string())?])?
            } else {
                TrustedKeys::from_files(&bundle_keys)
                    .map_err(|e| BadInput(super::monitor::chain(&e)))?
            };
            let out =
                patchover_monitor::publish(&dir, &signing, &keys, &Limits::default(), expires)
                    .map_err(|e| BadInput(super::monitor::chain(&e)))?;
            if ctx.json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!(
                    "{}: {} bundles, signed by key {} ({}), generated {}, {}",
                    out.index.display(),
                    out.bundles,
                    out.key_id,
                    out.signature.display(),
                    out.generated,
                    out.expires
                        .as_deref()
                        .map_or_else(|| "never expires".to_owned(), |e| format!("expires {e}"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
