//! Reading the administrator's reply (seed fig. 20, 1806): which challenge it answers, what
//! it decides, and the code that authenticates it.
//!
//! A reply is outside input that anyone can send, so this only *reads*; authenticating is
//! [`crate::approval`]'s job. The rules, chosen so that the quoted notice can never be taken
//! for the answer:
//! - the challenge comes from `In-Reply-To` / `References` (the notice's `Message-ID` names
//!   it), or else from a `Challenge:` line in the text;
//! - `Decision:` and `Code:` lines count only when not quoted (`>`), and only above the
//!   attribution line of a top-posting client (`On … wrote:`, `-----Original Message-----`);
//! - exactly one decision and one code; two different ones make the reply ambiguous.
//!
//! The parser is fuzzed (`fuzz/fuzz_targets/reply.rs`).

use mail_parser::{HeaderValue, MessageParser};
use serde::Serialize;

use crate::approval::{Decision, is_challenge};

/// The most bytes of a reply that are parsed at all.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// A reply that cannot be read as an answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("the mail is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("the mail is not parseable MIME")]
    Mime,
    #[error("the mail has no single From address")]
    From,
    #[error("the mail names no patchover challenge (neither In-Reply-To nor a Challenge: line)")]
    NoChallenge,
    #[error("the mail names more than one challenge")]
    AmbiguousChallenge,
    #[error("the mail has no text part")]
    NoText,
    #[error("the mail has no unquoted Decision: line")]
    NoDecision,
    #[error("the mail has no unquoted Code: line")]
    NoCode,
    #[error("the mail has more than one different Decision: or Code: line")]
    Ambiguous,
    #[error("the Decision: line is not valid")]
    Decision(#[source] crate::approval::ApprovalError),
}

impl ReplyError {
    pub fn reason(&self) -> &'static str {
        match self {
            ReplyError::TooLarge(_) => "too-large",
            ReplyError::Mime => "malformed-mime",
            ReplyError::From => "no-sender",
            ReplyError::NoChallenge | ReplyError::AmbiguousChallenge => "no-challenge",
            ReplyError::NoText => "malformed-mime",
            ReplyError::NoDecision | ReplyError::NoCode | ReplyError::Ambiguous => "no-decision",
            ReplyError::Decision(_) => "bad-decision",
        }
    }
}

/// What a reply says (not yet authenticated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    /// The sender, lowercase.
    pub from: String,
    pub challenge: String,
    pub decision: Decision,
    pub code: String,
}

/// The challenge a `Message-ID` of ours names (`patchover.<challenge>@domain`).
fn challenge_of_message_id(id: &str) -> Option<&str> {
    let id = id.trim().trim_start_matches('<').trim_end_matches('>');
    let rest = id.strip_prefix("patchover.")?;
    let (c, _) = rest.split_once('@')?;
    is_challenge(c).then_some(c)
}

fn texts<'a>(v: &'a HeaderValue<'a>) -> Vec<&'a str> {
    match v {
        HeaderValue::Text(t) => vec![t.as_ref()],
        HeaderValue::TextList(l) => l.iter().map(|s| s.as_ref()).collect(),
        _ => Vec::new(),
    }
}

fn is_attribution(line: &str) -> bool {
    let l = line.trim();
    (l.starts_with("On ") && l.ends_with("wrote:"))
        || l.starts_with("-----Original Message-----")
        || l.starts_with("-------- Original Message")
}

/// `Key: value` with a case-insensitive key.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let l = line.trim();
    let (k, v) = l.split_once(':')?;
    k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
}

/// Reads a raw reply mail.
pub fn parse_reply(raw: &[u8]) -> Result<Reply, ReplyError> {
    if raw.len() > MAX_REPLY_BYTES {
        return Err(ReplyError::TooLarge(raw.len()));
    }
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or(ReplyError::Mime)?;
    let from = {
        let addrs: Vec<&str> = msg
            .from()
            .map(|a| a.iter().filter_map(|a| a.address()).collect())
            .unwrap_or_default();
        match addrs.as_slice() {
            [one] if crate::config::valid_address(one) => one.to_ascii_lowercase(),
            _ => return Err(ReplyError::From),
        }
    };
    let mut challenges: Vec<String> = texts(msg.in_reply_to())
        .into_iter()
        .chain(texts(msg.references()))
        .filter_map(challenge_of_message_id)
        .map(str::to_owned)
        .collect();
    let text = msg.body_text(0).ok_or(ReplyError::NoText)?;
    if challenges.is_empty() {
        // No threading headers (a client that drops them): a Challenge: line, quoted or not.
        challenges = text
            .lines()
            .map(|l| l.trim_start_matches(|c: char| c == '>' || c.is_whitespace()))
            .filter_map(|l| field(l, "challenge"))
            .filter(|c| is_challenge(c))
            .map(str::to_owned)
            .collect();
    }
    challenges.sort();
    challenges.dedup();
    let challenge = match challenges.as_slice() {
        [] => return Err(ReplyError::NoChallenge),
        [one] => one.clone(),
        _ => return Err(ReplyError::AmbiguousChallenge),
    };
    let mut decisions: Vec<&str> = Vec::new();
    let mut codes: Vec<&str> = Vec::new();
    for line in text.lines() {
        if is_attribution(line) {
            break;
        }
        if line.trim_start().starts_with('>') {
            continue;
        }
        if let Some(d) = field(line, "decision") {
            decisions.push(d);
        } else if let Some(c) = field(line, "code") {
            codes.push(c);
        }
    }
    decisions.dedup();
    codes.dedup();
    let decision = match decisions.as_slice() {
        [] => return Err(ReplyError::NoDecision),
        [one] => one.parse::<Decision>().map_err(ReplyError::Decision)?,
        _ => return Err(ReplyError::Ambiguous),
    };
    let code = match codes.as_slice() {
        [] => return Err(ReplyError::NoCode),
        [one] => (*one).chars().take(100).collect(),
        _ => return Err(ReplyError::Ambiguous),
    };
    Ok(Reply {
        from,
        challenge,
        decision,
        code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

    fn mail(headers: &str, body: &str) -> Vec<u8> {
        format!(
            "From: Admin <Admin@Example.org>\r\nTo: po@example.org\r\nSubject: Re: x\r\n{headers}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
        )
        .into_bytes()
    }

    #[test]
    fn reads_a_threaded_reply_and_ignores_the_quote() {
        let m = mail(
            &format!("In-Reply-To: <patchover.{CH}@example.org>\r\n"),
            "Decision: approve all\r\nCode: AAAA-BBBB\r\n\r\n> Decision: reject all\r\n> Code: <the code>\r\n",
        );
        let r = parse_reply(&m).unwrap();
        assert_eq!(r.from, "admin@example.org");
        assert_eq!(r.challenge, CH);
        assert_eq!(r.decision.canonical(), "approve all");
        assert_eq!(r.code, "AAAA-BBBB");
    }

    #[test]
    fn challenge_line_without_threading_and_top_posting() {
        let m = mail(
            "",
            &format!(
                "decision: reject p1\r\ncode: X\r\n\r\nOn Tue, admin wrote:\r\n  Decision: approve all\r\nChallenge: {CH}\r\n"
            ),
        );
        let r = parse_reply(&m).unwrap();
        assert_eq!(r.challenge, CH);
        assert_eq!(r.decision.canonical(), "reject p1");
    }

    #[test]
    fn rejects_unusable_replies() {
        let threaded = format!("In-Reply-To: <patchover.{CH}@example.org>\r\n");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                mail("", "Decision: approve all\r\nCode: X\r\n"),
                "no-challenge",
            ),
            (mail(&threaded, "Code: X\r\n"), "no-decision"),
            (mail(&threaded, "Decision: approve all\r\n"), "no-decision"),
            (
                mail(
                    &threaded,
                    "Decision: approve all\r\nDecision: reject all\r\nCode: X\r\n",
                ),
                "no-decision",
            ),
            (
                mail(&threaded, "Decision: maybe\r\nCode: X\r\n"),
                "bad-decision",
            ),
            (
                format!("To: x@y\r\n{threaded}\r\nDecision: approve all\r\nCode: X\r\n")
                    .into_bytes(),
                "no-sender",
            ),
            (vec![b'x'; MAX_REPLY_BYTES + 1], "too-large"),
        ];
        for (m, reason) in cases {
            let e = parse_reply(&m).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
        }
    }
}
