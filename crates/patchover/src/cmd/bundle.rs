//! `patchover bundle …`: make, sign, verify and look into signed patch bundles.
//!
//! The work is done by `patchover-bundle`; this file only parses arguments, finds the trusted
//! keys (`--pubkey`, else `[bundles] trusted_keys` in the config) and prints. A bundle or key
//! that is rejected is bad input (exit code 2).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair, signature_path};
use patchover_bundle::verify::{inspect_bundle, verify_bundle_with};
use patchover_bundle::{BundlesConfig, Limits, TrustedKey, TrustedKeys};
use serde_json::json;

use super::{BadInput, Ctx};

/// The environment variable holding a secret key's password.
const PASSWORD_ENV: &str = "PATCHOVER_KEY_PASSWORD";

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Make a minisign key pair for signing bundles.
    Keygen {
        /// Where to write the public key (give it to every patchover that should trust it).
        #[arg(long)]
        public: PathBuf,
        /// Where to write the secret key (mode 0600).
        #[arg(long)]
        secret: PathBuf,
        /// Encrypt the secret key with the password in this file (or in $PATCHOVER_KEY_PASSWORD).
        /// Without either, the key is stored unencrypted, like `minisign -G -W`.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Pack DIR (manifest.toml + payload/) into a bundle file.
    Create {
        dir: PathBuf,
        /// The bundle file to write (e.g. fix-2026-001.tar.zst).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Sign a bundle: writes FILE.minisig.
    Sign {
        file: PathBuf,
        /// The minisign secret key.
        #[arg(long)]
        key: PathBuf,
        /// The secret key's password, if it is encrypted (or set $PATCHOVER_KEY_PASSWORD).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Check a bundle's signature against the trusted keys, then its contents.
    Verify {
        file: PathBuf,
        /// A trusted public key (repeatable). Default: [bundles] trusted_keys in the config.
        #[arg(long)]
        pubkey: Vec<PathBuf>,
        /// The signature file. Default: FILE.minisig.
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Show a bundle's manifest and contents (does NOT check the signature).
    Inspect { file: PathBuf },
    /// Make a bundle of the Debian updates the archive offers for LC's packages: docs/debian.md.
    FromApt {
        lc: String,
        /// The bundle file to write (nothing is written when there is nothing to update).
        #[arg(short, long)]
        output: PathBuf,
        /// Only the security suite (leave -updates out).
        #[arg(long)]
        security_only: bool,
        /// Only these installed packages (comma-separated) and what their updates need.
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// The archive, as an apt line "deb [signed-by=K] URI SUITE main" (repeatable).
        /// Default: the host's apt sources for the LC's suite, -updates and -security.
        #[arg(long)]
        source: Vec<String>,
    },
}

pub fn run(cmd: BundleCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCmd::FromApt {
            lc,
            output,
            security_only,
            packages,
            source,
        } => {
            let config = ctx.config()?;
            let spec = config
                .lc(&lc)
                .ok_or_else(|| BadInput(format!("unknown LC {lc:?}")))?;
            let sources = source
                .iter()
                .map(|l| patchover_debian::sources::Source::parse_line(l));
            let opts = patchover_debian::fromapt::FromAptOptions {
                lc,
                sources: sources
                    .collect::<Result<_, _>>()
                    .map_err(|e| BadInput(e.to_string()))?,
                security_only,
                packages,
                output,
                ..Default::default()
            };
            let disk = &spec.system_disk;
            let image = disk.kind == patchover_core::DiskKind::Image;
            // Only a VM's state is asked for: an `ns` LC's directory disk is read as it is.
            let env = if image { Some(ctx.env()?) } else { None };
            let running_vm = match &env {
                Some(env) => {
                    patchover_lc::LcBackend::status(&env.backend, spec)?.state
                        != patchover_lc::LcState::Stopped
                }
                None => false,
            };
            let out = match env {
                // A running VM's image is being written: its own tools read it, through the
                // agent (docs/debian.md, "A running VM").
                Some(env) if running_vm => {
                    let exec = |argv: &[String]| {
                        patchover_lc::LcBackend::exec(
                            &env.backend,
                            spec,
                            argv,
                            patchover_lc::Stdio::Capture,
                        )
                        .map(|o| patchover_debian::reader::ExecOut {
                            status: o.status,
                            stdout: o.stdout,
                        })
                        .map_err(|e| e.into())
                    };
                    patchover_debian::fromapt::from_apt_through_agent(&exec, &opts)
                }
                _ => patchover_debian::fromapt::from_apt_on_disk(&disk.path, image, &opts),
            }
            .map_err(|e| match e.is_bad_input() {
                true => anyhow::Error::from(BadInput(chain(&e))),
                false => anyhow::Error::from(e),
            })?;
            match ctx.json {
                true => println!("{}", serde_json::to_string(&out)?),
                false => println!("{out}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCmd::Keygen {
            public,
            secret,
            password_file,
        } => {
            let password = password(password_file.as_deref())?;
            let id = generate_keypair(&public, &secret, password.as_deref())
                .map_err(|e| BadInput(chain(&e)))?;
            if ctx.json {
                println!(
                    "{}",
                    json!({
                        "key_id": id.to_string(),
                        "public": public,
                        "secret": secret,
                        "encrypted": password.is_some(),
                    })
                );
            } else {
                println!("key {id}");
                println!(
                    "  public: {}  (list it under [bundles] trusted_keys)",
                    public.display()
                );
                println!(
                    "  secret: {}  ({})",
                    secret.display(),
                    if password.is_some() {
                        "encrypted"
                    } else {
                        "NOT encrypted: keep it safe"
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCmd::Create { dir, output } => {
            let c = create_bundle(&dir, &output).map_err(|e| BadInput(chain(&e)))?;
            if ctx.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!(
                    "created {} ({}, {} bytes, {} entries, sha256 {})",
                    c.path.display(),
                    c.id,
                    c.size,
                    c.entries,
                    c.sha256
                );
                println!(
                    "next: patchover bundle sign {} --key SECRET_KEY",
                    c.path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCmd::Sign {
            file,
            key,
            password_file,
        } => {
            let password = password(password_file.as_deref())?;
            let key = SigningKey::from_file(&key, password.as_deref())
                .map_err(|e| BadInput(chain(&e)))?;
            let s = sign_bundle(&file, &key).map_err(|e| BadInput(chain(&e)))?;
            if ctx.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "signed {} with key {} -> {}",
                    s.path.display(),
                    s.key_id,
                    s.signature.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCmd::Verify {
            file,
            pubkey,
            signature,
        } => {
            let (keys, limits) = trusted_keys(&pubkey, ctx)?;
            let sig = signature.unwrap_or_else(|| signature_path(&file));
            let v =
                verify_bundle_with(&file, &sig, &keys, &limits).map_err(|e| BadInput(chain(&e)))?;
            if ctx.json {
                println!(
                    "{}",
                    json!({
                        "verified": true,
                        "path": v.path(),
                        "id": v.id(),
                        "sha256": v.sha256().to_string(),
                        "size": v.size(),
                        "signature": v.signature(),
                        "manifest": v.manifest(),
                    })
                );
            } else {
                let m = v.manifest();
                println!(
                    "OK {} ({}, {}): signed by key {} ({})",
                    m.id,
                    m.category,
                    m.severity,
                    v.key_id(),
                    v.signature().key_source
                );
                println!("  sha256 {}", v.sha256());
                println!("  trusted comment: {}", v.signature().trusted_comment);
            }
            Ok(ExitCode::SUCCESS)
        }
        BundleCmd::Inspect { file } => {
            let i = inspect_bundle(&file, &Limits::default()).map_err(|e| BadInput(chain(&e)))?;
            if ctx.json {
                println!("{}", serde_json::to_string(&i)?);
            } else {
                print_inspection(&i);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_inspection(i: &patchover_bundle::verify::Inspection) {
    let m = &i.archive.manifest;
    println!("{}  {}", m.id, m.title);
    println!("  category  {}", m.category);
    println!("  severity  {}", m.severity);
    println!("  published {}", m.published.rfc3339);
    let lcs: Vec<&str> = m.targets.lcs.iter().map(|l| l.as_str()).collect();
    println!(
        "  targets   lcs: {}; images: {}",
        if lcs.is_empty() {
            "any".to_owned()
        } else {
            lcs.join(", ")
        },
        if m.targets.images.is_empty() {
            "any".to_owned()
        } else {
            m.targets.images.join(", ")
        }
    );
    println!(
        "  sha256    {}  ({} bytes, {} unpacked)",
        i.sha256, i.size, i.archive.unpacked_bytes
    );
    match i.signed_by {
        Some(k) => println!(
            "  signature {} names key {k} (not checked: run `bundle verify`)",
            signature_path(&i.path).display()
        ),
        None => println!("  signature none: sign it with `patchover bundle sign`"),
    }
    println!("  steps:");
    for (n, s) in m.steps.iter().enumerate() {
        println!("    {n}. {}", s.describe());
    }
    println!("  post-checks:");
    if m.checks.is_empty() {
        println!("    (none)");
    }
    for (n, c) in m.checks.iter().enumerate() {
        println!("    {n}. {}", c.kind());
    }
    println!("  entries:");
    for e in &i.archive.entries {
        match &e.kind {
            patchover_bundle::archive::EntryKind::File { size, mode } => {
                println!("    {mode:04o} {size:>10} {}", e.path)
            }
            patchover_bundle::archive::EntryKind::Dir => {
                println!("    dir             {}/", e.path)
            }
            patchover_bundle::archive::EntryKind::Symlink { target } => {
                println!("    link            {} -> {target}", e.path)
            }
        }
    }
}

/// The keys to trust: `--pubkey` files if given, else the config's `[bundles] trusted_keys`.
fn trusted_keys(pubkeys: &[PathBuf], ctx: &Ctx) -> anyhow::Result<(TrustedKeys, Limits)> {
    if !pubkeys.is_empty() {
        let keys = pubkeys
            .iter()
            .map(|p| TrustedKey::from_file(p))
            .collect::<Result<Vec<_>, _>>()
            .and_then(TrustedKeys::new)
            .map_err(|e| BadInput(chain(&e)))?;
        return Ok((keys, Limits::default()));
    }
    let config = ctx.config()?;
    let section = BundlesConfig::from_section(&config.bundles);
    if section.trusted_keys.is_empty() {
        return Err(BadInput(format!(
            "no trusted keys: pass --pubkey, or list public keys under [bundles] trusted_keys in {}",
            ctx.config_path.display()
        ))
        .into());
    }
    let keys = section
        .load_trusted_keys()
        .map_err(|e| BadInput(chain(&e)))?;
    Ok((keys, section.limits))
}

/// The secret key password: from `--password-file` (first line) or $PATCHOVER_KEY_PASSWORD.
fn password(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the password file {}", f.display()))?;
        let pw = text.lines().next().unwrap_or("").to_owned();
        if pw.is_empty() {
            return Err(BadInput(format!("the password file {} is empty", f.display())).into());
        }
        return Ok(Some(pw));
    }
    Ok(std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()))
}

/// An error with its causes on one line, for [`BadInput`] (which carries text only).
use patchover_core::error_chain as chain;
