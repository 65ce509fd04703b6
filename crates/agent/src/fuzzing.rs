//! Fuzz target body for the host's side of the agent channel: what patchover reads from an
//! LC's agent, which is untrusted (anything inside an LC is). Called by the libFuzzer target
//! `fuzz/fuzz_targets/agent_channel.rs` (`scripts/fuzz`). Whatever the agent sends, the host
//! must answer with a response or an error, never panic or hang, and never take a response
//! that was not one to its own request.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::apply::PatchReport;
use crate::{AgentClient, AgentError, MAX_LINE, Request, Response, ResponseEnvelope};

/// The id the fuzzed virtio-mode client sends its request with.
const ID: u64 = 7;

/// `data` as everything the agent end of a channel says, then closes; the host's client makes
/// one call on it (virtio mode with envelopes when `data` starts with an odd byte, the plain
/// socket mode otherwise). A report is decoded as the orchestrator does. Returns whether the
/// call was answered.
pub fn agent_channel(data: &[u8]) -> bool {
    let Some((&mode, said)) = data.split_first() else {
        return false;
    };
    let virtio = mode & 1 == 1;
    let request = match mode >> 1 & 3 {
        0 => Request::Ping,
        1 => Request::Report,
        _ => Request::Exec {
            argv: vec!["true".into()],
            timeout_ms: 1000,
        },
    };
    let (host, mut agent) = UnixStream::pair().expect("a socket pair");
    // Fuzz inputs stay far below the socket buffer: the write never waits.
    agent.write_all(said).expect("write the agent's words");
    agent
        .shutdown(std::net::Shutdown::Write)
        .expect("end the agent's words");
    let next_id = virtio.then_some(ID);
    let mut client = AgentClient::from_stream(host, Duration::from_secs(5), next_id)
        .expect("a client on a socket pair");
    match client.call(&request) {
        Ok(resp) => {
            check_answer(said, virtio, &resp);
            true
        }
        Err(AgentError::Io(e)) => panic!("the channel itself failed: {e}"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// A response the client accepted: one whole line of what the agent said carried it, it is
/// not an error, and a report decodes (or is refused) as the orchestrator would decode it.
fn check_answer(said: &[u8], virtio: bool, resp: &Response) {
    assert!(
        !matches!(resp, Response::Error { .. }),
        "an error as an answer"
    );
    let carried = said.split(|b| *b == b'\n').any(|line| {
        line.len() <= MAX_LINE
            && if virtio {
                serde_json::from_slice::<ResponseEnvelope>(line)
                    .is_ok_and(|e| e.id == ID && &e.response == resp)
            } else {
                serde_json::from_slice::<Response>(line).is_ok_and(|r| &r == resp)
            }
    });
    assert!(carried, "an answer no line carried: {resp:?}");
    if let Response::Report { report: Some(v) } = resp
        && let Ok(r) = serde_json::from_value::<PatchReport>(v.clone())
    {
        let _ = (r.report.all_ok(), r.report.failed());
        let again = serde_json::to_value(&r).expect("a report serialises");
        assert_eq!(serde_json::from_value::<PatchReport>(again).ok(), Some(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/agent_channel")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The committed seeds reach the answers (each mode, each request), so the fuzzer starts
    /// past the framing; an error, a foreign id and a cut line are not taken.
    #[test]
    fn the_seeds_are_answered_and_the_wrong_words_are_not() {
        for s in [
            "seed-ping",
            "seed-ping-virtio",
            "seed-report",
            "seed-report-virtio",
            "seed-exec",
        ] {
            assert!(agent_channel(&seed(s)), "{s}");
        }
        assert!(!agent_channel(&seed("seed-error")));
        let pong = r#"{"kind":"pong","agent_version":"1","hostname":"h","uptime_s":1.0,"pids":[]}"#;
        let other = format!("\x01{{\"id\":8,\"response\":{pong}}}\n");
        assert!(!agent_channel(other.as_bytes()), "another id's answer");
        assert!(
            !agent_channel(format!("\x00{pong}").as_bytes()),
            "a line cut short"
        );
        assert!(!agent_channel(b""));
    }
}
