//! A `kind = "apt"` feed (issue 24): the Debian archive of each active Debian LC, watched as
//! a feed (docs/monitor.md, "Watching apt").
//!
//! Each round, for each active LC (a directory system disk through its root handle; a VM
//! through its agent while it runs, its image mounted read-only while it is stopped):
//! apt plans the LC's pending updates exactly as `patchover bundle from-apt` does
//! ([`patchover_debian::fromapt::plan_with`]: the archive's signed indexes fetched and
//! verified, no package yet). The plan's digest (the LC's dpkg status and the `package=version`
//! list) is compared with the one remembered for the LC (`feed_state.apt_set`, one row per LC
//! named `<feed>/<lc>`): the same set does nothing more — no package is downloaded again. A
//! new set is built into a bundle (`from-apt`'s [`Planned::build`], targeted at the LC),
//! signed with the feed's `signing_key`, verified with the `[bundles]` keys (where that key is
//! trusted only for apt bundles, so every bundle the monitor makes goes through the shape
//! check), and registered; the round's notice then offers it like any new patch.
//!
//! A set that grew while its bundle waited for approval supersedes it: the open challenges
//! that offer the old bundle are closed as decided `superseded by <new id>` (a reply to the
//! old notice is then refused as a replay) and its apply-next flag is cleared; the new bundle,
//! with everything, gets a new notice.
//!
//! Failures back off per LC with the feeds' backoff ([`crate::poll::failed`]): an archive
//! unreachable or badly signed (`archive`), an LC without dpkg (`no-dpkg`), any other refusal
//! of from-apt (`lc`), a bundle that cannot be made, signed or verified (`bad-bundle`).

use std::path::{Path, PathBuf};

use patchover_bundle::keys::SigningKey;
use patchover_bundle::{IndexTrust, KeyScope, Limits, TrustedKeys, verify_bundle};
use patchover_debian::fromapt::{
    FromAptError, FromAptOptions, Planned, plan_with, with_disk_reader,
};
pub use patchover_debian::reader::ExecOut;
use patchover_debian::reader::{AgentReader, ExecFn, LcReader};
use patchover_debian::sources::Source;
use patchover_debian::status::StatusError;
use patchover_store::{FeedStateRow, Store};
use sha2::{Digest, Sha256};

use crate::config::AptFeedConfig;
use crate::poll::{FeedOutcome, FeedStatus, Registered, chain, failed, now_ms};

/// An apt feed's signing key that cannot be used; the monitor does not start.
#[derive(Debug, thiserror::Error)]
pub enum AptKeyError {
    #[error(
        "apt feed {feed}: its signing_key {} cannot be used; make a key pair with `patchover bundle keygen --public P --secret S` and list P in [[bundles.scoped_keys]] with scope = \"apt\"",
        path.display()
    )]
    Secret {
        feed: String,
        path: PathBuf,
        #[source]
        source: patchover_bundle::KeyError,
    },
    #[error(
        "apt feed {feed}: its signing_key {} (key {key_id}) is not trusted for apt bundles: list its public key in [[bundles.scoped_keys]] with scope = \"apt\"",
        path.display()
    )]
    NotTrusted {
        feed: String,
        path: PathBuf,
        key_id: patchover_bundle::KeyId,
    },
    #[error(
        "apt feed {feed}: its signing_key {} (key {key_id}) is trusted for every bundle ([bundles] trusted_keys {listed}); a key the monitor holds must sign apt bundles only: move it to [[bundles.scoped_keys]] with scope = \"apt\"",
        path.display()
    )]
    TooTrusted {
        feed: String,
        path: PathBuf,
        key_id: patchover_bundle::KeyId,
        listed: String,
    },
    #[error(
        "apt feed {feed}: source {line:?} {}; the bundles made from it would be refused: every source of an apt feed needs signed-by=KEYRING with KEYRING in archive_keyrings of the key's [[bundles.scoped_keys]] entry (now {trusted})",
        match keyring { Some(k) => format!("is signed with {k}, which is not in archive_keyrings"), None => "names no signed-by keyring".to_owned() }
    )]
    Keyring {
        feed: String,
        line: String,
        keyring: Option<String>,
        trusted: String,
    },
    #[error("apt feed {feed}: source {line:?}")]
    Source {
        feed: String,
        line: String,
        #[source]
        source: patchover_debian::sources::SourcesError,
    },
}

/// An apt feed ready to poll: its config, its signing key (checked against the trust store),
/// its sources.
#[derive(Clone)]
pub struct AptFeed {
    pub config: AptFeedConfig,
    signer: std::sync::Arc<SigningKey>,
    sources: Vec<Source>,
}

impl AptFeed {
    /// Loads the signing key and checks that `[bundles]` trusts it for apt bundles only.
    pub fn load(config: &AptFeedConfig, keys: &TrustedKeys) -> Result<AptFeed, AptKeyError> {
        let feed = config.name.clone();
        let path = config.signing_key.clone();
        let password = match &config.password_file {
            Some(p) => Some(read_password(p).map_err(|source| AptKeyError::Secret {
                feed: feed.clone(),
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        let signer = SigningKey::from_file(&path, password.as_deref()).map_err(|source| {
            AptKeyError::Secret {
                feed: feed.clone(),
                path: path.clone(),
                source,
            }
        })?;
        let key_id = signer.id();
        let keyrings = match keys.keys().iter().find(|k| k.id() == key_id) {
            Some(k) if k.scope() == Some(KeyScope::Apt) => match k.index() {
                Some(IndexTrust::Keyrings(rings)) => rings.clone(),
                _ => Vec::new(),
            },
            Some(k) => {
                return Err(AptKeyError::TooTrusted {
                    feed,
                    path,
                    key_id,
                    listed: k.source().to_owned(),
                });
            }
            None => return Err(AptKeyError::NotTrusted { feed, path, key_id }),
        };
        let sources: Vec<Source> = config
            .sources
            .iter()
            .map(|line| {
                Source::parse_line(line).map_err(|source| AptKeyError::Source {
                    feed: feed.clone(),
                    line: line.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        for s in &sources {
            let ok = s
                .signed_by
                .as_ref()
                .is_some_and(|k| keyrings.iter().any(|r| r == Path::new(k)));
            if !ok {
                return Err(AptKeyError::Keyring {
                    feed,
                    line: s.to_string(),
                    keyring: s.signed_by.clone(),
                    trusted: keyrings
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(AptFeed {
            config: config.clone(),
            signer: std::sync::Arc::new(signer),
            sources,
        })
    }
}

fn read_password(p: &Path) -> Result<String, patchover_bundle::KeyError> {
    std::fs::read_to_string(p)
        .map(|t| t.lines().next().unwrap_or("").to_owned())
        .map_err(|source| patchover_bundle::KeyError::Read {
            path: p.to_owned(),
            source,
        })
}

/// A VM's state and its agent: what the apt feed needs of the LC backends (the app's
/// `patchover_lc` backends provide it; the monitor crate does not start VMs).
pub trait VmAccess {
    /// Whether `spec` (a VM) is running (its image is then being written: read through its
    /// agent, never the image).
    fn is_running(&self, spec: &patchover_core::LcSpec) -> Result<bool, String>;
    /// Runs `argv` inside the running VM through its agent, its output captured.
    fn exec(
        &self,
        spec: &patchover_core::LcSpec,
        argv: &[String],
    ) -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>>;
}

/// How an active LC's packages are read.
pub enum AptLc<'a> {
    /// Its system disk: a directory through its root handle, or a stopped VM's image mounted
    /// read-only for the time of the poll.
    Disk {
        lc: String,
        path: PathBuf,
        image: bool,
    },
    /// A running VM: its own tools, through its agent (`bundle from-apt`'s way too).
    Agent { lc: String, exec: Box<ExecFn<'a>> },
}

impl<'a> AptLc<'a> {
    /// How to read `spec`: its directory disk; a VM through `vms` (its agent while it runs,
    /// its image while it is stopped). A VM without `vms` is not watched: the reason.
    pub fn of(
        spec: &'a patchover_core::LcSpec,
        vms: Option<&'a dyn VmAccess>,
    ) -> Result<AptLc<'a>, String> {
        let lc = spec.id.to_string();
        let disk = &spec.system_disk;
        if disk.kind == patchover_core::DiskKind::Dir {
            return Ok(AptLc::Disk {
                lc,
                path: disk.path.clone(),
                image: false,
            });
        }
        let Some(vms) = vms else {
            return Err(format!(
                "{lc} is a VM and this monitor has no access to the LC backends (a running VM's packages are read through its agent by `patchover bundle from-apt {lc}`)"
            ));
        };
        if vms.is_running(spec)? {
            Ok(AptLc::Agent {
                lc,
                exec: Box::new(move |argv: &[String]| vms.exec(spec, argv)),
            })
        } else {
            Ok(AptLc::Disk {
                lc,
                path: disk.path.clone(),
                image: true,
            })
        }
    }

    pub fn lc(&self) -> &str {
        match self {
            AptLc::Disk { lc, .. } | AptLc::Agent { lc, .. } => lc,
        }
    }
}

/// The outcome for an active LC an apt feed cannot watch (nothing contacted, no backoff).
pub fn not_watched(feed: &str, spec: &patchover_core::LcSpec, why: String) -> FeedOutcome {
    tracing::warn!(feed, lc = %spec.id, reason = "lc", %why, "LC not watched");
    FeedOutcome::refused(
        state_key(feed, spec.id.as_str()),
        spec.id.to_string(),
        "lc",
        why,
    )
}

/// What one LC's poll needs besides the store.
pub struct AptContext<'a> {
    pub bundle_keys: &'a TrustedKeys,
    pub limits: &'a Limits,
    pub bundles_dir: &'a Path,
    pub interval: std::time::Duration,
    pub backoff_max: std::time::Duration,
}

/// Why one LC's poll failed.
#[derive(Debug, thiserror::Error)]
enum AptPollError {
    #[error("planning the updates of {lc}")]
    Plan {
        lc: String,
        #[source]
        source: Box<FromAptError>,
    },
    #[error("making the bundle of {lc}'s updates")]
    Build {
        lc: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store")]
    Store(#[source] patchover_store::StoreError),
}

impl AptPollError {
    fn reason(&self) -> &'static str {
        match self {
            AptPollError::Plan { source, .. } => match **source {
                FromAptError::Apt(_) => "archive",
                FromAptError::Status(StatusError::Missing { .. }) => "no-dpkg",
                _ => "lc",
            },
            AptPollError::Build { .. } => "bad-bundle",
            AptPollError::Store(_) => "store",
        }
    }
}

/// The state row of `lc` under `feed`.
pub fn state_key(feed: &str, lc: &str) -> String {
    format!("{feed}/{lc}")
}

/// Polls one LC of an apt feed once: see the module doc.
pub fn poll_apt_lc(
    store: &mut Store,
    feed: &AptFeed,
    lc: &AptLc<'_>,
    cx: &AptContext<'_>,
) -> FeedOutcome {
    let now = now_ms();
    let key = state_key(&feed.config.name, lc.lc());
    let mut state = match store.feed_state(&key) {
        Ok(Some(s)) => s,
        _ => FeedStateRow {
            feed: key.clone(),
            url: format!("apt:{}", lc.lc()),
            ..FeedStateRow::default()
        },
    };
    let mut out = FeedOutcome::backing_off(key.clone(), state.next_attempt_ms);
    if now < state.next_attempt_ms {
        tracing::info!(feed = %key, until_ms = state.next_attempt_ms, "apt feed backing off after failures; not polled");
        return out;
    }
    state.last_checked_ms = Some(now);
    match poll_inner(store, feed, lc, cx, &mut state, &mut out) {
        Ok(()) => {
            state.failures = 0;
            state.next_attempt_ms = 0;
            state.last_ok_ms = Some(now);
            state.last_error = None;
            out.next_attempt_ms = 0;
        }
        Err(e) => {
            let backoff = (cx.interval, cx.backoff_max);
            failed(&mut state, &mut out, now, backoff, e.reason(), chain(&e));
        }
    }
    if let Err(e) = store.save_feed_state(&state) {
        tracing::error!(feed = %key, error = %chain(&e), "cannot save feed state");
    }
    out
}

fn poll_inner(
    store: &mut Store,
    feed: &AptFeed,
    lc: &AptLc<'_>,
    cx: &AptContext<'_>,
    state: &mut FeedStateRow,
    out: &mut FeedOutcome,
) -> Result<(), AptPollError> {
    let plan_err = |source| AptPollError::Plan {
        lc: lc.lc().to_owned(),
        source: Box::new(source),
    };
    match lc {
        AptLc::Disk { lc, path, image } => with_disk_reader(path, *image, lc, |r| {
            plan_and_build(store, feed, r, cx, state, out)
        })
        .map_err(plan_err)?,
        AptLc::Agent { lc, exec } => {
            plan_and_build(store, feed, &AgentReader::new(lc, exec), cx, state, out)
        }
    }
}

/// Plans `lc`'s updates; a new set is built, signed, verified and registered.
fn plan_and_build(
    store: &mut Store,
    feed: &AptFeed,
    lc: &dyn LcReader,
    cx: &AptContext<'_>,
    state: &mut FeedStateRow,
    out: &mut FeedOutcome,
) -> Result<(), AptPollError> {
    let name = lc.lc().to_owned();
    let plan_err = |source| AptPollError::Plan {
        lc: name.clone(),
        source: Box::new(source),
    };
    let mut opts = FromAptOptions {
        lc: name.clone(),
        sources: feed.sources.clone(),
        target_lc: true,
        ..FromAptOptions::default()
    };
    let planned = plan_with(lc, &opts).map_err(plan_err)?;
    out.listed = planned.updates.len();
    if planned.nothing_to_do().is_some() {
        out.status = FeedStatus::NotModified;
        return Ok(());
    }
    let set = planned.set_digest();
    let id = bundle_id(&name, &set);
    if state.apt_set.as_deref() == Some(set.as_str())
        || store.patch(&id).map_err(AptPollError::Store)?.is_some()
    {
        tracing::info!(feed = %state.feed, bundle = %id, "the same set of updates as before: nothing downloaded");
        out.status = FeedStatus::NotModified;
        state.apt_set = Some(set);
        return Ok(());
    }
    opts.id = Some(id.clone());
    let registered =
        build_and_register(store, feed, planned, &mut opts, cx).map_err(|source| match source {
            BuildError::Store(e) => AptPollError::Store(e),
            BuildError::Other(source) => AptPollError::Build {
                lc: name.clone(),
                source,
            },
        })?;
    if let Some(old) = state.apt_bundle.take() {
        supersede(store, &old, &id);
    }
    state.apt_set = Some(set);
    state.apt_bundle = Some(id);
    out.status = FeedStatus::Fetched;
    out.registered.push(registered);
    Ok(())
}

/// `apt-<16 hex digits of sha256(lc, set digest)>`: one id per LC and set.
pub fn bundle_id(lc: &str, set: &str) -> String {
    let h = Sha256::digest(format!("{lc}\n{set}").as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("apt-{hex}")
}

enum BuildError {
    Store(patchover_store::StoreError),
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for BuildError {
    fn from(e: E) -> Self {
        BuildError::Other(Box::new(e))
    }
}

/// Downloads and writes the bundle (beside its final place), signs it, verifies it with the
/// `[bundles]` keys (the apt scope's shape check), moves it into `bundles_dir` and registers it.
fn build_and_register(
    store: &mut Store,
    feed: &AptFeed,
    planned: Planned<'_>,
    opts: &mut FromAptOptions,
    cx: &AptContext<'_>,
) -> Result<Registered, BuildError> {
    let id = opts.id.clone().unwrap_or_default();
    std::fs::create_dir_all(cx.bundles_dir)?;
    let work = tempfile::Builder::new()
        .prefix(".apt-")
        .tempdir_in(cx.bundles_dir)?;
    let tmp = work.path().join(format!("{id}.tar.zst"));
    opts.output = tmp.clone();
    planned.build(opts)?;
    patchover_bundle::create::sign_bundle(&tmp, &feed.signer)?;
    let v = verify_bundle(&tmp, cx.bundle_keys, cx.limits)?;
    let file = cx.bundles_dir.join(format!("{id}.tar.zst"));
    let sig = patchover_bundle::keys::signature_path;
    std::fs::rename(sig(&tmp), sig(&file))?;
    std::fs::rename(&tmp, &file)?;
    crate::poll::register(store, &v, file).map_err(|e| match e {
        crate::poll::PollError::Store(s) => BuildError::Store(s),
        other => BuildError::Other(Box::new(other)),
    })
}

/// The pending bundle `old` is superseded by `new`: its open challenges are closed as decided
/// `superseded by <new>` and its apply-next flag is cleared.
fn supersede(store: &mut Store, old: &str, new: &str) {
    let now = now_ms();
    let open = match store.challenges() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot list challenges");
            return;
        }
    };
    for c in open
        .iter()
        .filter(|c| c.used_ms.is_none() && c.expires_ms > now && c.patches.iter().any(|p| p == old))
    {
        let decision = format!("superseded by {new}");
        match store.use_challenge(&c.id, &decision, "patchover", now) {
            Ok(_) => tracing::info!(challenge = %c.id, old, new, "pending apt bundle superseded"),
            Err(e) => {
                tracing::error!(challenge = %c.id, error = %chain(&e), "cannot close the superseded challenge")
            }
        }
    }
    if let Err(e) = store.mark_patch(old, false) {
        tracing::error!(patch = old, error = %chain(&e), "cannot unmark the superseded bundle");
    }
}
