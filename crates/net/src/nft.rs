//! nftables rules of the switcher, written as atomic `nft -j` batches.
//!
//! Two rule sets live here:
//! - the **service NAT** of `seamless` mode (seed embodiment 2): `ip daddr S dnat to <active>`
//!   in the host's prerouting and output hooks. A switch swaps the target in one transaction.
//!   Connection tracking pins every flow to the target chosen at its first packet, so flows the
//!   old LC accepted keep going there, and the kernel's reverse NAT rewrites the old LC's replies
//!   to come from `S` — the seed's packet-change program, for free and per flow.
//! - the **MAC fix** of `readdress` mode: a bridge-family rule that rewrites frames still sent to
//!   the old MAC for the service address. It catches the SYNs that were held during the pause
//!   (their Ethernet header was written before the switch) and neighbours that missed every
//!   gratuitous ARP.
//!
//! Each table belongs to one service address, so switches of different services never touch
//! each other's rules, and every batch replaces its table's content atomically.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use patchover_core::MacAddr;
use serde_json::{Value, json};

use crate::netns::{NetnsError, command_in};

/// Applying an nftables batch failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables")]
    Netns(#[from] NetnsError),
    #[error("nftables: cannot run nft; install the nftables package")]
    Spawn(#[source] std::io::Error),
    #[error("nftables: {what} rejected ({status}): {stderr}")]
    Rejected {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("nftables: cannot read the ruleset as JSON")]
    Json(#[source] serde_json::Error),
}

/// Table name for service address `service`.
pub fn table_name(service: Ipv4Addr) -> String {
    let o = service.octets();
    format!("patchover_{:02x}{:02x}{:02x}{:02x}", o[0], o[1], o[2], o[3])
}

/// Runs one JSON batch with `nft -j -f -` in `netns`; all or nothing.
pub fn apply(netns: Option<&Path>, what: &str, batch: &Value) -> Result<(), NftError> {
    Prepared::spawn(netns)?.apply(what, batch)
}

/// An `nft -j -f -` process started ahead of time, waiting for its batch on stdin.
///
/// Starting `nft` (exec, loading libnftables) takes milliseconds; inside a switch pause only
/// parsing and committing the batch should count. Dropped unused, the process is killed.
pub struct Prepared {
    child: Option<std::process::Child>,
}

impl Prepared {
    /// Starts `nft` in `netns`.
    pub fn spawn(netns: Option<&Path>) -> Result<Prepared, NftError> {
        let mut cmd = command_in(netns, "nft")?;
        cmd.args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Ok(Prepared {
            child: Some(cmd.spawn().map_err(NftError::Spawn)?),
        })
    }

    /// Feeds `batch` and waits for the commit.
    pub fn apply(mut self, what: &str, batch: &Value) -> Result<(), NftError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| NftError::Spawn(std::io::Error::other("used twice")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(batch.to_string().as_bytes())
                .map_err(NftError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                what: what.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lists the ruleset of `netns` as nft's JSON.
pub fn list(netns: Option<&Path>) -> Result<Value, NftError> {
    let mut cmd = command_in(netns, "nft")?;
    cmd.args(["-j", "list", "ruleset"]);
    let out = cmd.output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Rejected {
            what: "list ruleset".into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(NftError::Json)
}

fn ip_daddr(addr: Ipv4Addr) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": addr.to_string()}})
}

/// The batch that points service address `service` at `target` (seamless mode).
pub fn service_nat_batch(service: Ipv4Addr, target: Ipv4Addr) -> Value {
    service_nat_split_batch(service, target, target)
}

/// Like [`service_nat_batch`], but the host's own connections (the `output` hook) go to
/// `host_target` while forwarded ones (clients, `prerouting`) still go to `clients_target`:
/// the hand-off checks the standby through the NAT before any client is sent there.
pub fn service_nat_split_batch(
    service: Ipv4Addr,
    clients_target: Ipv4Addr,
    host_target: Ipv4Addr,
) -> Value {
    let t = table_name(service);
    let mut cmds = vec![
        json!({"add": {"table": {"family": "ip", "name": t}}}),
        json!({"flush": {"table": {"family": "ip", "name": t}}}),
    ];
    for (chain, hook, target) in [
        ("pre", "prerouting", clients_target),
        ("out", "output", host_target),
    ] {
        cmds.push(
            json!({"add": {"chain": {"family": "ip", "table": t, "name": chain,
            "type": "nat", "hook": hook, "prio": -100, "policy": "accept"}}}),
        );
        cmds.push(
            json!({"add": {"rule": {"family": "ip", "table": t, "chain": chain,
            "expr": [ip_daddr(service), {"dnat": {"addr": target.to_string()}}]}}}),
        );
    }
    json!({"nftables": cmds})
}

/// The batch that makes frames to `service` still addressed to `old` go to `new` (readdress).
pub fn mac_fix_batch(service: Ipv4Addr, old: MacAddr, new: MacAddr) -> Value {
    let t = table_name(service);
    json!({"nftables": [
        {"add": {"table": {"family": "bridge", "name": t}}},
        {"flush": {"table": {"family": "bridge", "name": t}}},
        {"add": {"chain": {"family": "bridge", "table": t, "name": "fix",
            "type": "filter", "hook": "prerouting", "prio": 100, "policy": "accept"}}},
        {"add": {"rule": {"family": "bridge", "table": t, "chain": "fix", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "daddr"}}, "right": old.to_string()}},
            ip_daddr(service),
            {"mangle": {"key": {"payload": {"protocol": "ether", "field": "daddr"}}, "value": new.to_string()}}
        ]}}}
    ]})
}

/// Like [`mac_fix_batch`] but only for packets with firewall mark `mark` (the SYNs held during
/// the pause): installed before the pause, it needs no nft run inside it.
pub fn mac_fix_marked_batch(service: Ipv4Addr, old: MacAddr, new: MacAddr, mark: u32) -> Value {
    let mut b = mac_fix_batch(service, old, new);
    if let Some(expr) = b["nftables"][3]["add"]["rule"]["expr"].as_array_mut() {
        expr.insert(
            0,
            json!({"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}}),
        );
    }
    b
}

/// The batch that removes the table of `service` in `family`, whether or not it exists.
pub fn remove_batch(family: &str, service: Ipv4Addr) -> Value {
    let t = table_name(service);
    json!({"nftables": [
        {"add": {"table": {"family": family, "name": t}}},
        {"delete": {"table": {"family": family, "name": t}}}
    ]})
}

/// The current DNAT target of `service` in `netns`, if its NAT table exists.
pub fn service_nat_target(
    netns: Option<&Path>,
    service: Ipv4Addr,
) -> Result<Option<Ipv4Addr>, NftError> {
    let rs = list(netns)?;
    Ok(nat_target_in(&rs, service))
}

fn nat_target_in(ruleset: &Value, service: Ipv4Addr) -> Option<Ipv4Addr> {
    let t = table_name(service);
    ruleset["nftables"].as_array()?.iter().find_map(|o| {
        let r = o.get("rule")?;
        if r["family"] != "ip" || r["table"] != t.as_str() || r["chain"] != "pre" {
            return None;
        }
        r["expr"]
            .as_array()?
            .iter()
            .find_map(|e| e.get("dnat")?.get("addr")?.as_str()?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_per_service() {
        assert_eq!(
            table_name(Ipv4Addr::new(10, 77, 0, 10)),
            "patchover_0a4d000a"
        );
    }

    #[test]
    fn nat_batch_replaces_both_hooks_atomically() {
        let b = service_nat_batch(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 3));
        let cmds = b["nftables"].as_array().unwrap();
        assert!(
            cmds[1].get("flush").is_some(),
            "the table is flushed in the same batch"
        );
        let dnats: Vec<_> = cmds
            .iter()
            .filter_map(|c| c["add"]["rule"]["expr"][1]["dnat"]["addr"].as_str())
            .collect();
        assert_eq!(dnats, ["10.0.0.3", "10.0.0.3"]);
    }

    #[test]
    fn split_batch_sends_only_the_host_to_the_new_target() {
        let s = Ipv4Addr::new(10, 0, 0, 1);
        let b = service_nat_split_batch(s, Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
        let by_chain: Vec<(&str, &str)> = b["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| {
                let r = &c["add"]["rule"];
                Some((r["chain"].as_str()?, r["expr"][1]["dnat"]["addr"].as_str()?))
            })
            .collect();
        assert_eq!(by_chain, [("pre", "10.0.0.2"), ("out", "10.0.0.3")]);
        // Recovery reads the clients' target, which has not moved yet.
        let rs = json!({"nftables": b["nftables"].as_array().unwrap().iter()
            .filter_map(|c| c["add"].get("rule").map(|r| json!({"rule": r}))).collect::<Vec<_>>()});
        assert_eq!(nat_target_in(&rs, s), Some(Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn marked_mac_fix_matches_the_mark_first() {
        let b = mac_fix_marked_batch(
            Ipv4Addr::new(10, 0, 0, 1),
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            7,
        );
        let expr = &b["nftables"][3]["add"]["rule"]["expr"];
        assert_eq!(expr[0]["match"]["left"]["meta"]["key"], "mark");
        assert_eq!(expr[0]["match"]["right"], 7);
        assert_eq!(expr[3]["mangle"]["value"], "02:00:00:00:00:02");
    }

    #[test]
    fn reads_the_nat_target_back_from_nft_json() {
        let rs = json!({"nftables": [
            {"metainfo": {}},
            {"rule": {"family": "ip", "table": "patchover_0a000001", "chain": "pre", "handle": 3,
              "expr": [{"match": {}}, {"dnat": {"addr": "10.0.0.7"}}]}}
        ]});
        assert_eq!(
            nat_target_in(&rs, Ipv4Addr::new(10, 0, 0, 1)),
            Some(Ipv4Addr::new(10, 0, 0, 7))
        );
        assert_eq!(nat_target_in(&rs, Ipv4Addr::new(10, 0, 0, 2)), None);
    }
}
