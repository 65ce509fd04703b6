//! One round of the patch monitor (seed fig. 19 and 20): poll the feeds, mail the notice,
//! read the replies, act on the genuine decisions.
//!
//! [`Monitor::decide`] is the single place a decision takes effect, whether it came by mail
//! or from `patchover approve` on the host: challenge known, not used, not expired; code
//! genuine (constant-time); the decision only names patches the challenge offered; then the
//! challenge is used atomically, the apply-next flags are set (1808), and the patch cycle is
//! started for the affected LCs (1809) through [`PatchStarter`], which the binary implements
//! by spawning `patchover patch LC --bundle …`.
//!
//! Wrong codes are counted on the challenge and logged with the claimed sender, but they never
//! lock it: a `From` line is forged at will, so a lockout would let anyone who can send a mail
//! deny the administrator's real answer, and it buys nothing against guessing (a code is 120
//! bits of HMAC; each guess costs a mail read once per round).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use patchover_bundle::{Limits, TrustedKeys, verify_bundle};
use patchover_store::{NewChallenge, Store};
use serde::Serialize;

use crate::approval::{ApprovalError, Decision, Secret, Verdict, new_challenge};
use crate::apt::{AptContext, AptFeed, AptLc, poll_apt_lc};
use crate::config::{FeedConfig, MonitorConfig};
use crate::fetch::{FetchPolicy, Fetcher, HttpUrl};
use crate::index::rfc3339;
use crate::mailbox::Inbox;
use crate::notice::{NoticeItem, compose, send};
use crate::poll::{FeedOutcome, PollContext, Registered, chain, now_ms, poll_feed};
use crate::reply::parse_reply;

/// A patch run that was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunHandle {
    pub lc: String,
    pub bundles: Vec<String>,
    /// The process running the cycle, when it is one.
    pub pid: Option<u32>,
}

/// A patch run that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the patch cycle for {lc}")]
    Spawn {
        lc: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the patch cycle for {lc} was refused: {message}")]
    Refused { lc: String, message: String },
}

/// Starts the patch cycle (seed fig. 19, 1809) for one LC with the approved bundles.
pub trait PatchStarter {
    fn start(&self, lc: &str, bundle_ids: &[String]) -> Result<RunHandle, StartError>;
}

/// A decision that was not taken; nothing was marked or started.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("unknown challenge {0}")]
    Unknown(String),
    #[error("challenge {0} was already used (a replayed answer?)")]
    Used(String),
    #[error("challenge {0} has expired; wait for the next notice or approve on the host")]
    Expired(String),
    #[error("the code does not match decision `{decision}` on challenge {challenge}")]
    BadCode { challenge: String, decision: String },
    #[error("the code is malformed")]
    CodeFormat(#[source] ApprovalError),
    #[error("decision names patches the challenge did not offer: {0}")]
    NotOffered(String),
    #[error("no approval secret: set [monitor] secret_file")]
    NoSecret,
    #[error("approval secret")]
    Secret(#[source] ApprovalError),
    #[error("store")]
    Store(#[source] patchover_store::StoreError),
}

impl DecisionError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecisionError::Unknown(_) => "unknown-challenge",
            DecisionError::Used(_) => "replayed",
            DecisionError::Expired(_) => "expired",
            DecisionError::BadCode { .. } | DecisionError::CodeFormat(_) => "bad-code",
            DecisionError::NotOffered(_) => "not-offered",
            DecisionError::NoSecret | DecisionError::Secret(_) => "no-secret",
            DecisionError::Store(_) => "store",
        }
    }
}

/// What a genuine decision did.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionOutcome {
    pub challenge: String,
    pub decision: String,
    pub verdict: Verdict,
    pub patches: Vec<String>,
    pub decided_by: String,
    pub started: Vec<RunHandle>,
    /// Runs that could not be started, or patches whose LC could not be found.
    pub start_errors: Vec<String>,
}

/// A notice sent (or not) in this round.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeOutcome {
    pub challenge: String,
    pub patches: Vec<String>,
    pub sent: bool,
    pub error: Option<String>,
}

/// One mail read in this round.
#[derive(Debug, Clone, Serialize)]
pub struct ReplyOutcome {
    pub uid: u32,
    pub from: Option<String>,
    pub challenge: Option<String>,
    pub accepted: bool,
    pub reason: Option<&'static str>,
    pub detail: Option<String>,
    pub decision: Option<DecisionOutcome>,
}

/// What `monitor run-once` did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub feeds: Vec<FeedOutcome>,
    pub notices: Vec<NoticeOutcome>,
    pub replies: Vec<ReplyOutcome>,
    pub mailbox_error: Option<String>,
    pub duration_ms: u64,
}

/// The monitor, with everything it needs but the store.
pub struct Monitor<'a> {
    pub config: &'a MonitorConfig,
    /// `[bundles]` trusted keys; when empty each feed's own keys verify its bundles.
    pub bundle_keys: TrustedKeys,
    pub limits: Limits,
    /// Where downloaded bundles are kept.
    pub bundles_dir: PathBuf,
    /// The LCs the config defines (targets outside it are ignored).
    pub lcs: Vec<String>,
    /// This host's name, for the notice.
    pub host: String,
    pub starter: &'a dyn PatchStarter,
    /// The `kind = "apt"` feeds, their keys checked ([`AptFeed::load`]). Each watches the LCs
    /// the resource table has active (those its `lcs` names, or all).
    pub apt_feeds: Vec<AptFeed>,
    /// The LC backends' VM state and agents, so an apt feed watches VMs too; `None`: VMs
    /// are not watched (each round says so for each).
    pub vms: Option<&'a dyn crate::apt::VmAccess>,
}

/// The LCs the resource table has active (an apt feed watches those).
fn active_lcs(store: &Store) -> Vec<patchover_store::LcRow> {
    match store.lcs() {
        Ok(rows) => rows
            .into_iter()
            .filter(|r| r.role == patchover_store::Role::Active)
            .collect(),
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot read the resource table");
            Vec::new()
        }
    }
}

/// This host's name (from the kernel), for mails.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn load_keys(paths: &[PathBuf]) -> Result<TrustedKeys, patchover_bundle::KeyError> {
    TrustedKeys::from_files(paths)
}

impl Monitor<'_> {
    /// One full round: feeds, notices, replies.
    pub fn run_once(&self, store: &mut Store) -> RunReport {
        let t0 = std::time::Instant::now();
        let feeds = self.poll_feeds(store);
        let registered: Vec<Registered> = feeds
            .iter()
            .flat_map(|f| f.registered.iter().cloned())
            .collect();
        let notices = self.notify(store, &registered);
        let (replies, mailbox_error) = match self.check_mailbox(store) {
            Ok(r) => (r, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        RunReport {
            feeds,
            notices,
            replies,
            mailbox_error,
            duration_ms: t0.elapsed().as_millis() as u64,
        }
    }

    /// Polls every feed once (fig. 19, 1801–1803).
    pub fn poll_feeds(&self, store: &mut Store) -> Vec<FeedOutcome> {
        let mut out: Vec<FeedOutcome> = self
            .config
            .feeds
            .iter()
            .map(|feed| self.poll_one(store, feed))
            .collect();
        let cx = AptContext {
            bundle_keys: &self.bundle_keys,
            limits: &self.limits,
            bundles_dir: &self.bundles_dir,
            interval: self.config.interval,
            backoff_max: self.config.backoff_max,
        };
        if self.apt_feeds.is_empty() {
            return out;
        }
        let lcs = active_lcs(store);
        for feed in &self.apt_feeds {
            let named = &feed.config.lcs;
            for lc in lcs
                .iter()
                .filter(|l| named.is_empty() || named.contains(&l.spec.id.to_string()))
            {
                out.push(match AptLc::of(&lc.spec, self.vms) {
                    Ok(alc) => poll_apt_lc(store, feed, &alc, &cx),
                    Err(e) => crate::apt::not_watched(&feed.config.name, &lc.spec, e),
                });
            }
        }
        out
    }

    /// A feed whose own configuration (keys, CA) cannot be used: not contacted, no backoff.
    fn unusable(feed: &FeedConfig, reason: &'static str, e: &dyn std::error::Error) -> FeedOutcome {
        tracing::error!(feed = %feed.name, reason, error = %chain(e), "feed not polled: its configuration cannot be used");
        FeedOutcome::refused(feed.name.clone(), feed.name.clone(), reason, chain(e))
    }

    fn poll_one(&self, store: &mut Store, feed: &FeedConfig) -> FeedOutcome {
        let index_keys = match load_keys(&feed.trusted_keys) {
            Ok(k) => k,
            Err(e) => return Self::unusable(feed, "bad-keys", &e),
        };
        let mut allowed = self.config.allowed_hosts.clone();
        if let Ok(u) = HttpUrl::parse(&feed.url) {
            allowed.push(u.host());
        }
        let fetcher = match Fetcher::new(FetchPolicy {
            timeout: self.config.http_timeout,
            max_redirects: self.config.max_redirects,
            allowed_hosts: allowed,
            ca_file: feed.ca_file.clone(),
        }) {
            Ok(f) => f,
            Err(e) => return Self::unusable(feed, e.reason(), &e),
        };
        let bundle_keys = if self.bundle_keys.is_empty() {
            &index_keys
        } else {
            &self.bundle_keys
        };
        let cx = PollContext {
            fetcher: &fetcher,
            index_keys: &index_keys,
            bundle_keys,
            limits: &self.limits,
            max_index_bytes: self.config.max_index_bytes,
            bundles_dir: &self.bundles_dir,
            interval: self.config.interval,
            backoff_max: self.config.backoff_max,
        };
        poll_feed(store, feed, &cx)
    }

    /// Makes a challenge for the newly registered patches (only security ones if so
    /// configured) and mails every notice not yet sent (fig. 19, 1804–1805).
    pub fn notify(&self, store: &mut Store, registered: &[Registered]) -> Vec<NoticeOutcome> {
        let items: Vec<&Registered> = registered
            .iter()
            .filter(|r| {
                !self.config.security_only || r.category == patchover_core::Category::Security
            })
            .collect();
        let now = now_ms();
        let mut made = None;
        if !items.is_empty() {
            match new_challenge() {
                Ok(challenge) => {
                    let ids: Vec<String> = items.iter().map(|r| r.id.clone()).collect();
                    let mid = crate::notice::message_id(&challenge, &self.config.from);
                    let expires = now + self.config.challenge_ttl.as_millis() as i64;
                    if let Err(e) = store.insert_challenge(&NewChallenge {
                        id: &challenge,
                        patches: &ids,
                        message_id: &mid,
                        created_ms: now,
                        expires_ms: expires,
                    }) {
                        tracing::error!(error = %chain(&e), "cannot record the challenge");
                    } else {
                        made = Some(challenge);
                    }
                }
                Err(e) => tracing::error!(error = %chain(&e), "cannot make a challenge"),
            }
        }
        let pending = match store.challenges() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %chain(&e), "cannot list challenges");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        // Without SMTP only the new challenge is reported (once); with it, every open
        // challenge whose notice was not sent yet is (re)tried.
        for c in pending.into_iter().filter(|c| {
            c.notified_ms.is_none()
                && c.used_ms.is_none()
                && c.expires_ms > now
                && (self.config.smtp.is_some() || made.as_deref() == Some(c.id.as_str()))
        }) {
            let mut list = Vec::new();
            for id in &c.patches {
                if let Ok(Some(p)) = store.patch(id) {
                    list.push(NoticeItem {
                        id: p.id,
                        title: p.title,
                        category: p.category.to_string(),
                        severity: p.severity,
                        published: p.published,
                    });
                }
            }
            let notice = compose(
                &self.host,
                &self.config.from,
                &c.id,
                &list,
                &rfc3339(c.expires_ms / 1000),
            );
            let result = match &self.config.smtp {
                None => Err(crate::notice::NoticeError::NoSmtp),
                Some(server) => send(server, &self.config.from, &self.config.admins, &notice),
            };
            let (sent, error) = match result {
                Ok(()) => {
                    if let Err(e) = store.mark_challenge_notified(&c.id, now_ms()) {
                        tracing::error!(error = %chain(&e), "cannot record the notice");
                    }
                    (true, None)
                }
                Err(e) => {
                    tracing::warn!(challenge = %c.id, error = %chain(&e), "notice not sent; retried next round");
                    (false, Some(chain(&e)))
                }
            };
            out.push(NoticeOutcome {
                challenge: c.id,
                patches: c.patches,
                sent,
                error,
            });
        }
        out
    }

    /// Reads the replies that arrived since the last look (fig. 20, 1806–1809).
    pub fn check_mailbox(&self, store: &mut Store) -> Result<Vec<ReplyOutcome>, String> {
        let Some(server) = &self.config.imap else {
            return Ok(Vec::new());
        };
        let mut inbox = Inbox::open(server).map_err(|e| {
            let d = chain(&e);
            tracing::warn!(error = %d, "cannot read the approval mailbox");
            d
        })?;
        let key = format!("{}@{}:{}", inbox.mailbox(), server.host, server.port);
        let last = match store.mailbox_state(&key) {
            Ok(Some((v, last))) if v == inbox.uid_validity() => last,
            Ok(_) => 0,
            Err(e) => return Err(chain(&e)),
        };
        let mails = inbox
            .mails_after(last, self.config.max_mail_bytes)
            .map_err(|e| chain(&e))?;
        let mut out = Vec::new();
        let mut high = last;
        for m in mails {
            let outcome = self.handle_mail(store, m.uid, m.size, m.body.as_deref());
            if outcome.accepted {
                tracing::info!(uid = m.uid, from = ?outcome.from, challenge = ?outcome.challenge, "approval reply accepted");
            } else {
                tracing::warn!(uid = m.uid, from = ?outcome.from, reason = ?outcome.reason, detail = ?outcome.detail, "approval reply rejected");
            }
            out.push(outcome);
            if let Err(e) = inbox.mark_seen(m.uid) {
                tracing::debug!(error = %chain(&e), "cannot flag mail as seen");
            }
            high = high.max(m.uid);
            if let Err(e) = store.save_mailbox_state(&key, inbox.uid_validity(), high) {
                tracing::error!(error = %chain(&e), "cannot save the mailbox position");
            }
        }
        inbox.logout();
        Ok(out)
    }

    fn handle_mail(
        &self,
        store: &mut Store,
        uid: u32,
        size: u32,
        body: Option<&[u8]>,
    ) -> ReplyOutcome {
        let mut o = ReplyOutcome {
            uid,
            from: None,
            challenge: None,
            accepted: false,
            reason: None,
            detail: None,
            decision: None,
        };
        let Some(body) = body else {
            o.reason = Some("too-large");
            o.detail = Some(format!(
                "{size} bytes, over the limit of {}",
                self.config.max_mail_bytes
            ));
            return o;
        };
        let reply = match parse_reply(body) {
            Ok(r) => r,
            Err(e) => {
                o.reason = Some(e.reason());
                o.detail = Some(chain(&e));
                return o;
            }
        };
        o.from = Some(reply.from.clone());
        o.challenge = Some(reply.challenge.clone());
        if !self.config.admins.contains(&reply.from) {
            o.reason = Some("unexpected-sender");
            o.detail = Some(format!("{} is not in [monitor] admins", reply.from));
            return o;
        }
        match self.decide(
            store,
            &reply.challenge,
            &reply.decision,
            Some(&reply.code),
            &reply.from,
        ) {
            Ok(d) => {
                o.accepted = true;
                o.decision = Some(d);
            }
            Err(e) => {
                o.reason = Some(e.reason());
                o.detail = Some(chain(&e));
            }
        }
        o
    }

    fn secret(&self) -> Result<Secret, DecisionError> {
        let path = self
            .config
            .secret_file
            .as_ref()
            .ok_or(DecisionError::NoSecret)?;
        Secret::from_file(path).map_err(DecisionError::Secret)
    }

    /// Authenticates and applies a decision (fig. 20, 1807–1809). `code: None` is only for
    /// the host's own `patchover approve` run by root without a code, which is trusted as the
    /// host itself; everything from outside passes a code.
    pub fn decide(
        &self,
        store: &mut Store,
        challenge: &str,
        decision: &Decision,
        code: Option<&str>,
        by: &str,
    ) -> Result<DecisionOutcome, DecisionError> {
        let c = store
            .challenge(challenge)
            .map_err(DecisionError::Store)?
            .ok_or_else(|| DecisionError::Unknown(challenge.to_owned()))?;
        let now = now_ms();
        if c.used_ms.is_some() {
            return Err(DecisionError::Used(c.id));
        }
        if now >= c.expires_ms {
            return Err(DecisionError::Expired(c.id));
        }
        if let Some(code) = code {
            let secret = self.secret()?;
            let ok = secret
                .verify(&c.id, decision, code)
                .map_err(DecisionError::CodeFormat);
            if !matches!(ok, Ok(true)) {
                let n = store
                    .record_challenge_failure(&c.id)
                    .map_err(DecisionError::Store)?;
                // Counted and logged, never a lockout: the sender may be anyone (see above).
                tracing::warn!(challenge = %c.id, failed_attempts = n, by, "wrong approval code; the challenge stays open");
                ok?;
                return Err(DecisionError::BadCode {
                    challenge: c.id,
                    decision: decision.canonical(),
                });
            }
        }
        let patches = decision
            .resolve(&c.patches)
            .map_err(|foreign| DecisionError::NotOffered(foreign.join(", ")))?;
        if !store
            .use_challenge(&c.id, &decision.canonical(), by, now)
            .map_err(DecisionError::Store)?
        {
            return Err(DecisionError::Used(c.id));
        }
        let mut out = DecisionOutcome {
            challenge: c.id.clone(),
            decision: decision.canonical(),
            verdict: decision.verdict,
            patches: patches.clone(),
            decided_by: by.to_owned(),
            started: Vec::new(),
            start_errors: Vec::new(),
        };
        let approve = decision.verdict == Verdict::Approve;
        for id in &patches {
            // 1808: the apply-next-run flags, as instructed.
            if let Err(e) = store.mark_patch(id, approve) {
                out.start_errors.push(format!("{id}: {}", chain(&e)));
            }
        }
        tracing::info!(challenge = %c.id, decision = %out.decision, by, "decision taken");
        if approve {
            self.start_runs(store, &patches, &mut out);
        }
        Ok(out)
    }

    /// 1809: groups the approved patches by target LC and starts one cycle per LC.
    fn start_runs(&self, store: &Store, patches: &[String], out: &mut DecisionOutcome) {
        let mut by_lc: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for id in patches {
            let Ok(Some(row)) = store.patch(id) else {
                out.start_errors
                    .push(format!("{id}: not in the patch table"));
                continue;
            };
            let targets = match self.targets_of(Path::new(&row.file)) {
                Ok(t) => t,
                Err(e) => {
                    out.start_errors.push(format!("{id}: {e}"));
                    continue;
                }
            };
            if targets.is_empty() {
                out.start_errors.push(format!(
                    "{id}: names no LC of this host and [monitor] lcs is empty; run `patchover patch LC --bundle {id}`"
                ));
            }
            for lc in targets {
                by_lc
                    .entry(lc)
                    .or_default()
                    .push((row.published.clone(), id.clone()));
            }
        }
        for (lc, mut ids) in by_lc {
            ids.sort();
            let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
            match self.starter.start(&lc, &ids) {
                Ok(h) => {
                    tracing::info!(lc = %lc, bundles = ?ids, pid = ?h.pid, "patch cycle started");
                    out.started.push(h);
                }
                Err(e) => {
                    tracing::error!(lc = %lc, error = %chain(&e), "cannot start the patch cycle");
                    out.start_errors.push(chain(&e));
                }
            }
        }
    }

    /// The LCs a registered bundle targets: its manifest's LCs that this host has, or
    /// `[monitor] lcs` when it names none. The bundle is verified again (it is read anyway).
    fn targets_of(&self, file: &Path) -> Result<Vec<String>, String> {
        let keys = if self.bundle_keys.is_empty() {
            let mut all = Vec::new();
            for f in &self.config.feeds {
                if let Ok(k) = load_keys(&f.trusted_keys) {
                    for key in k.keys() {
                        if !all
                            .iter()
                            .any(|o: &patchover_bundle::TrustedKey| o.id() == key.id())
                        {
                            all.push(key.clone());
                        }
                    }
                }
            }
            TrustedKeys::new(all).map_err(|e| chain(&e))?
        } else {
            self.bundle_keys.clone()
        };
        let v = verify_bundle(file, &keys, &self.limits).map_err(|e| chain(&e))?;
        let named: Vec<String> = v
            .manifest()
            .targets
            .lcs
            .iter()
            .map(|l| l.to_string())
            .filter(|l| self.lcs.contains(l))
            .collect();
        if named.is_empty() && v.manifest().targets.lcs.is_empty() {
            Ok(self.config.lcs.clone())
        } else {
            Ok(named)
        }
    }
}
