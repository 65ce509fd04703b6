//! Approval codes (seed fig. 20, 1807): how an administrator's answer is authenticated.
//!
//! The notice mail carries a fresh random *challenge*. The administrator's side and the
//! monitor share a secret; both derive the code the same way, as HMAC-SHA256 keyed with the
//! secret over the challenge *and* the decision (approve or reject, which patches). So a code
//! proves knowledge of the secret, binds the exact decision (a code for "approve p1" is not
//! valid for "approve p1,p2" or "reject p1"), and is worthless for any other challenge. The
//! monitor compares codes in constant time (`Mac::verify_truncated_left`); single use and
//! expiry are enforced by the store ([`patchover_store::Store::use_challenge`]).
//!
//! A code is the first 15 bytes (120 bits) of the MAC in RFC 4648 base32, in groups of four
//! (`ABCD-EFGH-…`), so it can be read out and typed; case, dashes and spaces are ignored.

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ct_codecs::{Base32NoPadding, Decoder, Encoder};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use patchover_bundle::BundleId;

/// Bytes of the MAC carried by a code.
pub const CODE_BYTES: usize = 15;
/// The shortest shared secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;
const MAX_SECRET_BYTES: u64 = 4096;
/// Domain separation: a code is never a MAC of anything else made with the same secret.
const CONTEXT: &str = "patchover-approval-v1";

/// A decision or code that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "decision {0:?} is not valid: write `approve all`, `reject all`, or `approve ID…` / `reject ID…`"
    )]
    Decision(String),
    #[error("decision names {0:?}, which is not a bundle id")]
    DecisionId(String),
    #[error("code {0:?} is not an approval code (24 base32 letters, e.g. ABCD-EFGH-…)")]
    CodeFormat(String),
    #[error("cannot read the approval secret {path}")]
    ReadSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the approval secret {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    SecretMode { path: PathBuf, mode: u32 },
    #[error(
        "the approval secret {path} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
    )]
    SecretSize { path: PathBuf },
    #[error("{0:?} is not a base URL for approval links (write https://host/path)")]
    Link(String),
    #[error("approval link: {0}")]
    Query(&'static str),
    #[error("cannot get random bytes from the kernel")]
    Random(#[source] std::io::Error),
}

/// Approve or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Approve,
    Reject,
}

/// Which patches a decision covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every patch the challenge offered.
    All,
    Patches(BTreeSet<String>),
}

/// An administrator's decision on a challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub scope: Scope,
}

impl Decision {
    /// The one spelling the code is computed over: `approve all`, `reject p1,p2` (ids sorted).
    pub fn canonical(&self) -> String {
        let verb = match self.verdict {
            Verdict::Approve => "approve",
            Verdict::Reject => "reject",
        };
        match &self.scope {
            Scope::All => format!("{verb} all"),
            Scope::Patches(ids) => {
                format!(
                    "{verb} {}",
                    ids.iter().cloned().collect::<Vec<_>>().join(",")
                )
            }
        }
    }

    /// The patch ids it covers, given those the challenge offered; ids not offered are
    /// returned in the error slot so the caller can refuse the decision.
    pub fn resolve(&self, offered: &[String]) -> Result<Vec<String>, Vec<String>> {
        match &self.scope {
            Scope::All => Ok(offered.to_vec()),
            Scope::Patches(ids) => {
                let foreign: Vec<String> = ids
                    .iter()
                    .filter(|i| !offered.contains(i))
                    .cloned()
                    .collect();
                if foreign.is_empty() {
                    Ok(ids.iter().cloned().collect())
                } else {
                    Err(foreign)
                }
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl FromStr for Decision {
    type Err = ApprovalError;
    /// `approve all`, `reject all`, `approve p1 p2`, `approve p1,p2` (case-insensitive verb).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ApprovalError::Decision(s.chars().take(200).collect());
        let mut words = s
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty());
        let verdict = match words.next().map(str::to_ascii_lowercase).as_deref() {
            Some("approve") => Verdict::Approve,
            Some("reject") => Verdict::Reject,
            _ => return Err(bad()),
        };
        let rest: Vec<&str> = words.collect();
        let scope = match rest.as_slice() {
            [] => return Err(bad()),
            [one] if one.eq_ignore_ascii_case("all") => Scope::All,
            ids => {
                if ids.len() > 1000 || ids.iter().any(|i| i.eq_ignore_ascii_case("all")) {
                    return Err(bad());
                }
                let mut set = BTreeSet::new();
                for id in ids {
                    BundleId::from_str(id)
                        .map_err(|_| ApprovalError::DecisionId(id.chars().take(80).collect()))?;
                    set.insert((*id).to_owned());
                }
                Scope::Patches(set)
            }
        };
        Ok(Decision { verdict, scope })
    }
}

/// The shared secret codes are keyed with.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from bytes; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_bytes(bytes: &[u8]) -> Option<Secret> {
        let trimmed = bytes.trim_ascii();
        (trimmed.len() >= MIN_SECRET_BYTES).then(|| Secret(trimmed.to_vec()))
    }

    /// Reads the secret file, refusing one that group or others can read.
    pub fn from_file(path: &Path) -> Result<Secret, ApprovalError> {
        let read_err = |source| ApprovalError::ReadSecret {
            path: path.to_owned(),
            source,
        };
        let md = std::fs::metadata(path).map_err(read_err)?;
        if md.mode() & 0o077 != 0 {
            return Err(ApprovalError::SecretMode {
                path: path.to_owned(),
                mode: md.mode() & 0o7777,
            });
        }
        if md.len() > MAX_SECRET_BYTES {
            return Err(ApprovalError::SecretSize {
                path: path.to_owned(),
            });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        Secret::from_bytes(&bytes).ok_or_else(|| ApprovalError::SecretSize {
            path: path.to_owned(),
        })
    }

    fn mac(&self, challenge: &str, decision: &Decision) -> Hmac<Sha256> {
        // new_from_slice accepts keys of any length for HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(CONTEXT.as_bytes());
        mac.update(b"\n");
        mac.update(challenge.as_bytes());
        mac.update(b"\n");
        mac.update(decision.canonical().as_bytes());
        mac
    }

    /// The code for `decision` on `challenge`.
    pub fn code(&self, challenge: &str, decision: &Decision) -> String {
        let tag = self.mac(challenge, decision).finalize().into_bytes();
        format_code(&base32_encode(&tag[..CODE_BYTES]))
    }

    /// Whether `code` is the code for `decision` on `challenge` (constant-time compare).
    pub fn verify(
        &self,
        challenge: &str,
        decision: &Decision,
        code: &str,
    ) -> Result<bool, ApprovalError> {
        let bytes = parse_code(code)?;
        Ok(self
            .mac(challenge, decision)
            .verify_truncated_left(&bytes)
            .is_ok())
    }
}

/// RFC 4648 base32 without padding (`ct-codecs`: constant time, so decoding a code typed
/// in does not leak by its timing which letters were right).
fn base32_encode(data: &[u8]) -> String {
    Base32NoPadding::encode_to_string(data).expect("base32 of a few bytes fits")
}

fn base32_decode(s: &str) -> Option<Vec<u8>> {
    Base32NoPadding::decode_to_vec(s, None).ok()
}

fn format_code(s: &str) -> String {
    s.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// A code as typed: case, dashes and spaces do not matter; it must decode to 15 bytes.
pub fn parse_code(code: &str) -> Result<Vec<u8>, ApprovalError> {
    let norm: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let bad = || ApprovalError::CodeFormat(code.chars().take(80).collect());
    if norm.len() != 24 {
        return Err(bad());
    }
    match base32_decode(&norm) {
        Some(b) if b.len() == CODE_BYTES => Ok(b),
        _ => Err(bad()),
    }
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), ApprovalError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(ApprovalError::Random)
}

/// A fresh challenge: 20 random bytes in base32 (32 letters), unguessable and mail-safe.
pub fn new_challenge() -> Result<String, ApprovalError> {
    let mut b = [0u8; 20];
    random_bytes(&mut b)?;
    Ok(base32_encode(&b))
}

/// Whether `s` looks like a challenge (so a reply's text can be searched for one).
pub fn is_challenge(s: &str) -> bool {
    s.len() == 32 && base32_decode(s).is_some()
}

/// The approval link the administrator's side makes (`patchover approval-code --link`):
/// `base?challenge=…&decision=…&code=…`. It carries the code, never the secret; the daemon's
/// handler passes what [`parse_approval_query`] returns to `Monitor::decide`, so a link is
/// exactly as strong (and as single-use) as a mailed reply.
pub fn approval_link(
    base: &str,
    challenge: &str,
    decision: &Decision,
    code: &str,
) -> Result<String, ApprovalError> {
    let canonical = decision.canonical();
    url::Url::parse_with_params(
        base,
        &[
            ("challenge", challenge),
            ("decision", canonical.as_str()),
            ("code", code),
        ],
    )
    .map(String::from)
    .map_err(|_| ApprovalError::Link(base.chars().take(200).collect()))
}

/// Reads an approval link's query string: `(challenge, decision, code)`.
pub fn parse_approval_query(query: &str) -> Result<(String, Decision, String), ApprovalError> {
    let (mut ch, mut d, mut code) = (None, None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match k.as_ref() {
            "challenge" => &mut ch,
            "decision" => &mut d,
            "code" => &mut code,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApprovalError::Query("a parameter is given twice"));
        }
        *slot = Some(v.into_owned());
    }
    let ch = ch.ok_or(ApprovalError::Query("no challenge"))?;
    if !is_challenge(&ch) {
        return Err(ApprovalError::Query("the challenge is malformed"));
    }
    let d: Decision = d.ok_or(ApprovalError::Query("no decision"))?.parse()?;
    let code = code.ok_or(ApprovalError::Query("no code"))?;
    parse_code(&code)?;
    Ok((ch, d, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_bytes(b"0123456789abcdef0123456789abcdef\n").unwrap()
    }

    #[test]
    fn code_binds_challenge_decision_and_secret() {
        let s = secret();
        let d: Decision = "approve p1 p2".parse().unwrap();
        let code = s.code("CHALLENGE", &d);
        assert_eq!(code.len(), 24 + 5);
        assert!(s.verify("CHALLENGE", &d, &code).unwrap());
        // Case, dashes and spaces do not matter.
        let typed = code.replace('-', " ").to_lowercase();
        assert!(s.verify("CHALLENGE", &d, &typed).unwrap());
        // Same decision spelt differently: same code.
        let d2: Decision = "APPROVE p2,p1".parse().unwrap();
        assert!(s.verify("CHALLENGE", &d2, &code).unwrap());
        // Another decision, another challenge or another secret: refused.
        let other: Decision = "approve p1".parse().unwrap();
        assert!(!s.verify("CHALLENGE", &other, &code).unwrap());
        let reject: Decision = "reject p1 p2".parse().unwrap();
        assert!(!s.verify("CHALLENGE", &reject, &code).unwrap());
        assert!(!s.verify("CHALLENGF", &d, &code).unwrap());
        let s2 = Secret::from_bytes(b"another secret of enough length").unwrap();
        assert!(!s2.verify("CHALLENGE", &d, &code).unwrap());
        // A one-letter change is refused.
        let mut forged = code.clone().into_bytes();
        forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(!s.verify("CHALLENGE", &d, &forged).unwrap());
        assert!(s.verify("CHALLENGE", &d, "short").is_err());
        assert!(s.verify("CHALLENGE", &d, &"1".repeat(24)).is_err());
    }

    #[test]
    fn decisions_parse_and_resolve() {
        let all: Decision = "Approve ALL".parse().unwrap();
        assert_eq!(all.canonical(), "approve all");
        let offered = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(all.resolve(&offered).unwrap(), offered);
        let some: Decision = "reject b".parse().unwrap();
        assert_eq!(some.resolve(&offered).unwrap(), vec!["b".to_owned()]);
        let foreign: Decision = "approve c".parse().unwrap();
        assert_eq!(foreign.resolve(&offered).unwrap_err(), vec!["c".to_owned()]);
        for bad in ["", "approve", "yes all", "approve ../x", "approve all x"] {
            assert!(bad.parse::<Decision>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn base32_round_trips_and_challenges_are_fresh() {
        for n in 0..40 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base32_encode(&data);
            let dec = base32_decode(&enc).unwrap();
            assert_eq!(&dec[..data.len()], &data[..]);
        }
        let a = new_challenge().unwrap();
        let b = new_challenge().unwrap();
        assert!(is_challenge(&a) && is_challenge(&b));
        assert_ne!(a, b);
        assert!(!is_challenge(&a.to_ascii_lowercase()) && !is_challenge(&a[1..]));
    }

    /// RFC 4648's vectors (unpadded): the codes and challenges made before base32 went through
    /// ct-codecs read the same.
    #[test]
    fn base32_is_rfc_4648() {
        for (plain, enc) in [
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foob", "MZXW6YQ"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), enc);
            assert_eq!(base32_decode(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(base32_decode("MZXW1"), None);
    }

    #[test]
    fn approval_links_round_trip() {
        let s = secret();
        let ch = new_challenge().unwrap();
        let d: Decision = "approve b,a".parse().unwrap();
        let code = s.code(&ch, &d);
        let link = approval_link("https://host:8443/v1/approve", &ch, &d, &code).unwrap();
        assert!(link.starts_with("https://host:8443/v1/approve?challenge="));
        let q = link.split_once('?').unwrap().1;
        let (ch2, d2, code2) = parse_approval_query(q).unwrap();
        assert_eq!(
            (ch2.as_str(), &d2, code2.as_str()),
            (ch.as_str(), &d, code.as_str())
        );
        assert!(s.verify(&ch2, &d2, &code2).unwrap());
        for bad in [
            "",
            "challenge=x&decision=approve+all&code=AAAA",
            &format!("challenge={ch}&decision=approve+all"),
            &format!("challenge={ch}&challenge={ch}&decision=approve+all&code={code}"),
            &format!("challenge={ch}&decision=maybe&code={code}"),
        ] {
            assert!(parse_approval_query(bad).is_err(), "{bad}");
        }
        assert!(approval_link("not a url", &ch, &d, &code).is_err());
    }

    #[test]
    fn short_secret_refused() {
        assert!(Secret::from_bytes(b"short\n").is_none());
    }
}
