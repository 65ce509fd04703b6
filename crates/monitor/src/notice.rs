//! The notice mail (seed fig. 19, 1804–1805): the new patches, with a fresh approval
//! challenge and how to answer.
//!
//! The mail is plain text only (no HTML part to render or to hide text in), with a
//! `Message-ID` that names the challenge, so the administrator's reply comes back with it in
//! `In-Reply-To`, and a `Date`. The body says exactly which lines to put in the reply and how
//! to compute the code on the administrator's side (`patchover approval-code`).

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{SmtpTransport, Transport};
use serde::Serialize;

use crate::config::{MailServer, PasswordFileError, TlsMode};

/// The notice could not be sent; the challenge stays unannounced and is retried.
#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("no [monitor] admins to mail: list at least one address")]
    NoAdmins,
    #[error("no [monitor.smtp] server configured")]
    NoSmtp,
    #[error("mail address {0:?} is not usable")]
    Address(String),
    #[error("cannot build the notice mail")]
    Build(#[source] lettre::error::Error),
    #[error("SMTP TLS setup for {host}")]
    Tls {
        host: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("cannot read the SMTP CA file")]
    CaFile(#[source] std::io::Error),
    #[error("SMTP password")]
    Password(#[source] PasswordFileError),
    #[error("cannot send the notice through {host}:{port}")]
    Send {
        host: String,
        port: u16,
        #[source]
        source: lettre::transport::smtp::Error,
    },
}

/// One patch as the notice lists it.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeItem {
    pub id: String,
    pub title: String,
    pub category: String,
    pub severity: String,
    pub published: String,
}

/// A composed notice.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    pub challenge: String,
    /// Without angle brackets.
    pub message_id: String,
    pub subject: String,
    pub body: String,
}

/// The `Message-ID` of the notice for `challenge` (without angle brackets).
pub fn message_id(challenge: &str, from: &str) -> String {
    let domain = from.rsplit_once('@').map_or("localhost", |(_, d)| d);
    format!("patchover.{challenge}@{domain}")
}

/// Writes the notice text for `items` under `challenge`.
pub fn compose(
    host: &str,
    from: &str,
    challenge: &str,
    items: &[NoticeItem],
    expires_rfc3339: &str,
) -> Notice {
    let mut body = String::new();
    let n = items.len();
    body.push_str(&format!(
        "patchover on {host} registered {n} new patch{} in its patch table:\n\n",
        if n == 1 { "" } else { "es" }
    ));
    let w = items.iter().map(|i| i.id.len()).max().unwrap_or(2).max(2);
    body.push_str(&format!(
        "  {:<w$}  {:<11}  {:<8}  {:<20}  title\n",
        "id", "category", "severity", "published"
    ));
    for i in items {
        body.push_str(&format!(
            "  {:<w$}  {:<11}  {:<8}  {:<20}  {}\n",
            i.id, i.category, i.severity, i.published, i.title
        ));
    }
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    body.push_str(&format!(
        "\nChallenge: {challenge}\nExpires:   {expires_rfc3339}\n\n\
To answer, reply to this mail. Put these two lines in your reply, not quoted:\n\n\
  Decision: approve all\n\
  Code: <the code for that decision>\n\n\
The decision is `approve all`, `reject all`, or `approve` / `reject` followed by\n\
patch ids, e.g. `approve {}`. Compute the code with the shared approval secret:\n\n\
  patchover approval-code {challenge} --decision \"approve all\" --secret-file SECRET\n\n\
An approved patch is marked for the next run and the patch cycle starts for the LCs it\n\
targets. The challenge is good for one decision and expires at the time above.\n",
        ids.first().copied().unwrap_or("ID"),
    ));
    let subject = format!(
        "[patchover] {n} new patch{} on {host} (challenge {challenge})",
        if n == 1 { "" } else { "es" }
    );
    Notice {
        challenge: challenge.to_owned(),
        message_id: message_id(challenge, from),
        subject,
        body,
    }
}

fn mailbox(a: &str) -> Result<Mailbox, NoticeError> {
    a.parse().map_err(|_| NoticeError::Address(a.to_owned()))
}

/// Sends `notice` from `from` to every admin through `server`.
pub fn send(
    server: &MailServer,
    from: &str,
    admins: &[String],
    notice: &Notice,
) -> Result<(), NoticeError> {
    if admins.is_empty() {
        return Err(NoticeError::NoAdmins);
    }
    let mut b = Message::builder()
        .from(mailbox(from)?)
        .subject(notice.subject.clone())
        .message_id(Some(format!("<{}>", notice.message_id)))
        .date_now()
        .header(ContentType::TEXT_PLAIN);
    for a in admins {
        b = b.to(mailbox(a)?);
    }
    let msg = b.body(notice.body.clone()).map_err(NoticeError::Build)?;
    let transport = transport(server)?;
    transport.send(&msg).map_err(|source| NoticeError::Send {
        host: server.host.clone(),
        port: server.port,
        source,
    })?;
    tracing::info!(challenge = %notice.challenge, admins = admins.len(), server = %server.host, "notice mail sent");
    Ok(())
}

fn transport(server: &MailServer) -> Result<SmtpTransport, NoticeError> {
    let tls_err = |source| NoticeError::Tls {
        host: server.host.clone(),
        source,
    };
    let params = || -> Result<TlsParameters, NoticeError> {
        let mut b = TlsParameters::builder(server.host.clone());
        if let Some(ca) = &server.ca_file {
            let pem = std::fs::read(ca).map_err(NoticeError::CaFile)?;
            b = b.add_root_certificate(Certificate::from_pem(&pem).map_err(tls_err)?);
        }
        b.build_rustls().map_err(tls_err)
    };
    let tls = match server.tls {
        TlsMode::None => Tls::None,
        TlsMode::Starttls => Tls::Required(params()?),
        TlsMode::Tls => Tls::Wrapper(params()?),
    };
    let mut b = SmtpTransport::builder_dangerous(server.host.clone())
        .port(server.port)
        .tls(tls)
        .timeout(Some(server.timeout));
    if let (Some(user), Some(pw)) = (
        &server.username,
        server.password().map_err(NoticeError::Password)?,
    ) {
        b = b.credentials(Credentials::new(user.clone(), pw));
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_lists_patches_and_says_how_to_answer() {
        let items = vec![NoticeItem {
            id: "sec-1".into(),
            title: "fix the thing".into(),
            category: "security".into(),
            severity: "high".into(),
            published: "2026-11-20T10:00:00Z".into(),
        }];
        let n = compose(
            "host1",
            "po@example.org",
            "CHAL",
            &items,
            "2026-11-21T10:00:00Z",
        );
        assert!(n.subject.contains("1 new patch on host1"));
        assert!(n.body.contains("sec-1"));
        assert!(n.body.contains("security"));
        assert!(n.body.contains("Challenge: CHAL"));
        assert!(n.body.contains("patchover approval-code CHAL"));
        assert_eq!(n.message_id, "patchover.CHAL@example.org");
    }
}
