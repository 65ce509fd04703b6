//! Step 701: find a standby LC whose resources cover the active one's (seed fig. 5).

use patchover_core::{Config, LcSpec};

/// No LC can stand in; says what each candidate lacks.
#[derive(Debug, thiserror::Error)]
#[error("standby search: no unused LC covers {active}: {}", if reasons.is_empty() { "the config defines no other LC; add one with at least the same resources".to_owned() } else { reasons.join("; ") })]
pub struct NoStandby {
    pub active: String,
    /// One line per candidate: `lc3: needs 50% of a CPU, has 30%`.
    pub reasons: Vec<String>,
}

/// Picks the first LC (in config order) that is not `active`, is not running, and covers its
/// resources. `running(id)` tells whether an LC is running; `disk_room(candidate)` returns a
/// reason if the candidate's disks cannot hold the active one's data.
pub fn find_standby<'c>(
    config: &'c Config,
    active: &LcSpec,
    running: &dyn Fn(&LcSpec) -> bool,
    disk_room: &dyn Fn(&LcSpec) -> Option<String>,
) -> Result<&'c LcSpec, NoStandby> {
    let mut reasons = Vec::new();
    for c in config.lcs.iter().filter(|c| c.id != active.id) {
        if running(c) {
            reasons.push(format!("{}: is running (in use)", c.id));
            continue;
        }
        if let Some(why) = c.shortfall_against(active) {
            reasons.push(format!("{}: {why}", c.id));
            continue;
        }
        if let Some(why) = disk_room(c) {
            reasons.push(format!("{}: {why}", c.id));
            continue;
        }
        return Ok(c);
    }
    Err(NoStandby {
        active: active.id.to_string(),
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use patchover_core::HostFacts;

    use super::*;

    fn config() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
[[lc]]
id = "lc1"
cpu = 0
cpu_share = 50
memory_mib = 128
system_disk = { path = "/d/1s" }
app_disk = { path = "/d/1a" }
nic = [{ name = "eth0" }]
[[lc]]
id = "lc3"
cpu = 1
cpu_share = 50
memory_mib = 64
system_disk = { path = "/d/3s" }
app_disk = { path = "/d/3a" }
nic = [{ name = "eth0" }]
[[lc]]
id = "lc2"
cpu = 1
cpu_share = 50
memory_mib = 128
system_disk = { path = "/d/2s" }
app_disk = { path = "/d/2a" }
nic = [{ name = "eth0" }]
"#,
            &HostFacts {
                cpus: 2,
                memory_mib: 4096,
            },
        )
        .unwrap()
    }

    #[test]
    fn picks_the_first_lc_that_covers_the_active_one() {
        let c = config();
        let active = c.lc("lc1").unwrap();
        let s = find_standby(&c, active, &|_| false, &|_| None).unwrap();
        assert_eq!(s.id.as_str(), "lc2", "lc3 has too little memory");
    }

    #[test]
    fn says_what_each_candidate_lacks() {
        let c = config();
        let active = c.lc("lc1").unwrap();
        let err = find_standby(&c, active, &|l| l.id.as_str() == "lc2", &|_| None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("lc3: needs 128 MiB memory, has 64 MiB"),
            "{msg}"
        );
        assert!(msg.contains("lc2: is running"), "{msg}");
        let err = find_standby(&c, active, &|_| false, &|l| {
            Some(format!("{} is full", l.id))
        })
        .unwrap_err();
        assert!(err.to_string().contains("lc2: lc2 is full"), "{err}");
    }
}
