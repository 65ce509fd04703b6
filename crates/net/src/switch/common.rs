//! What every mode shares: the checks before anything changes, the preparation before the
//! pause, the drain wait, the check through the service address, the report.

use std::time::{Duration, Instant};

use crate::health::{self, Inside};
use crate::lc::InLc;
use crate::network::{Network, ServiceAddress};
use crate::rtnl::{LinkInfo, RtnlError};

use super::{Endpoint, Hooks, Mode, RunOn, SwitchError, SwitchPlan, SwitchReport, on};

/// How often the drain is polled while new connections are held (the pause waits on it).
pub(super) const PAUSED_DRAIN_POLL: Duration = Duration::from_micros(500);
/// How often the drain is polled once the standby serves (nothing waits on it but the report).
pub(super) const BACKGROUND_DRAIN_POLL: Duration = Duration::from_millis(5);

/// What the drain wait saw.
pub(super) struct DrainWait {
    pub took: Duration,
    /// Busy connections left (0: drained).
    pub left: usize,
    /// How many times the old LC's connections were looked at.
    pub looks: u32,
    /// How long the first look took: on a namespace LC, one walk of the kernel's TCP table
    /// (the later looks follow what it found, and one more walk confirms the end).
    pub first_look: Duration,
}

/// One switch, after its checks: the plan, the network, and the way into both LCs.
pub(super) struct Ctx<'a> {
    pub plan: &'a SwitchPlan,
    pub net: &'a dyn Network,
    pub addr: ServiceAddress,
    pub bridge: LinkInfo,
    pub from_port: LinkInfo,
    pub to_port: LinkInfo,
    pub from_lc: Box<dyn InLc>,
    pub to_lc: Box<dyn InLc>,
    /// The decision: the checks passed.
    pub t0: Instant,
}

fn need_link(net: &dyn Network, name: &str) -> Result<LinkInfo, SwitchError> {
    Ok(net.link(name)?.ok_or_else(|| RtnlError::NoSuchLink {
        name: name.to_string(),
    })?)
}

impl<'a> Ctx<'a> {
    /// Checks without changing anything: the bridge and both ports exist, the live path is
    /// what the plan says, nobody else answers for the address, the standby answers.
    pub(super) fn checked(
        net: &'a dyn Network,
        plan: &'a SwitchPlan,
        hooks: &mut Hooks<'_>,
    ) -> Result<Ctx<'a>, SwitchError> {
        let addr = ServiceAddress::of(plan);
        let bridge = addr.bridge_link(net)?;
        let from_port = need_link(net, &plan.from.host_port)?;
        let to_port = need_link(net, &plan.to.host_port)?;
        // One way into each LC for the whole switch (a namespace worker, or the agent channel).
        let from_lc = net.open_lc(&plan.from).map_err(on(&plan.from))?;
        let to_lc = net.open_lc(&plan.to).map_err(on(&plan.to))?;
        let mut ctx = Ctx {
            plan,
            net,
            addr,
            bridge,
            from_port,
            to_port,
            from_lc,
            to_lc,
            t0: Instant::now(),
        };
        // The live path must be what the plan says, or we would "switch" something else.
        match plan.mode {
            Mode::Path => super::path::check_live(&ctx)?,
            Mode::Readdress => super::readdress::check_live(&ctx)?,
            Mode::Seamless => super::seamless::check_live(&ctx)?,
        }
        if plan.mode != Mode::Seamless {
            ctx.nobody_else_answers()?;
        }
        // The standby must answer before we touch anything. It is resumed first only when an
        // earlier switch drained it (`resume_to`): a standby never drained needs no undoing.
        if plan.resume_to {
            hooks
                .service
                .resume(&plan.to)
                .map_err(|source| SwitchError::Hook {
                    hook: "resume",
                    source,
                })?;
        }
        let run = RunOn {
            svc: &*hooks.service,
            ep: &plan.to,
        };
        health::check_own(
            Inside::of(&*ctx.to_lc).running(&run),
            &plan.to.iface,
            plan.to.address.addr,
            &plan.health.expecting(&plan.to.identity),
        )
        .map_err(|source| SwitchError::StandbyNotReady {
            to: plan.to.name.clone(),
            source,
        })?;
        ctx.t0 = Instant::now();
        Ok(ctx)
    }

    /// Nobody but the two LCs may answer for the service address on the bridge.
    fn nobody_else_answers(&self) -> Result<(), SwitchError> {
        let plan = self.plan;
        let Some(bridge_mac) = self.bridge.mac else {
            return Ok(());
        };
        let owners = self.net.who_has(&plan.bridge, bridge_mac, self.addr.addr)?;
        if let Some(mac) = owners
            .into_iter()
            .find(|m| *m != plan.from.mac && *m != plan.to.mac)
        {
            return Err(SwitchError::AddressTaken {
                addr: self.addr.addr,
                mac,
                from: plan.from.name.clone(),
                to: plan.to.name.clone(),
            });
        }
        Ok(())
    }

    /// This switch's report with every figure zero (the modes fill in theirs).
    pub(super) fn report(&self) -> SwitchReport {
        SwitchReport::new(self.plan.mode, &self.plan.from.name, &self.plan.to.name)
    }

    /// Opens everything the pause needs, so the pause only does the switching itself: netlink
    /// in both LCs (readdress moves the address) and a packet socket in the standby (the
    /// announcement inside the pause), an agent is pinged so a dead one fails here; a worker
    /// in the check namespace; an `nft` waiting for its batch.
    pub(super) fn ready(&self) -> Result<(), SwitchError> {
        let plan = self.plan;
        let readdress = plan.mode == Mode::Readdress;
        let announce = plan.mode != Mode::Seamless;
        self.to_lc
            .prepare(&plan.to.iface, readdress, announce)
            .map_err(on(&plan.to))?;
        self.from_lc
            .prepare(&plan.from.iface, readdress, false)
            .map_err(on(&plan.from))?;
        self.net.prepare_check()?;
        if plan.mode != Mode::Path {
            self.net.prepare_nft()?;
        }
        Ok(())
    }

    /// Waits, polling every `poll`, until the old LC has no busy connection on the service
    /// port or the drain deadline passed.
    pub(super) fn wait_drained(&self, poll: Duration) -> DrainWait {
        let start = Instant::now();
        let mut warned = false;
        let mut looks = 0u32;
        let mut first_look = Duration::ZERO;
        loop {
            let t = Instant::now();
            // A failed count counts as busy, so a drain never ends on an error.
            let left = match self.from_lc.busy_tcp_connections(self.plan.health.port) {
                Ok(n) => n,
                Err(e) => {
                    if !warned {
                        tracing::warn!(lc = %self.plan.from.name, error = %e, "cannot count the old LC's connections");
                        warned = true;
                    }
                    usize::MAX
                }
            };
            looks += 1;
            if looks == 1 {
                first_look = t.elapsed();
            }
            let done = |left| DrainWait {
                took: start.elapsed(),
                left,
                looks,
                first_look,
            };
            if left == 0 {
                return done(0);
            }
            if start.elapsed() >= self.plan.drain_deadline {
                return done(left);
            }
            std::thread::sleep(poll);
        }
    }

    /// The standby answers through the service address, from where the switch checks.
    pub(super) fn check_to(&self) -> Result<(), SwitchError> {
        check_through(self.net, self.plan, &*self.to_lc)
    }

    /// The side `forward` moves from and the side it moves to: (endpoint, its port, its LC).
    pub(super) fn sides(&self, forward: bool) -> [(&Endpoint, &LinkInfo, &dyn InLc); 2] {
        let from = (&self.plan.from, &self.from_port, &*self.from_lc);
        let to = (&self.plan.to, &self.to_port, &*self.to_lc);
        if forward { [from, to] } else { [to, from] }
    }
}

/// The check through the service address from where the switch checks (the host, or
/// `check_from`), and the proof of who answered it: right after it, the checking namespace's
/// neighbour entry for the address its packets went to (the service address; in `seamless`
/// the standby's own, after the host's NAT) must be the standby's NIC. A stranger answering
/// 200 fails the check naming both MACs. In `path` mode both LCs share one MAC; the old LC's
/// port is off the bridge by then, so a stranger is what this catches. `to_lc` is the
/// standby, asked what it saw when the check fails.
pub fn check_through(
    net: &dyn Network,
    plan: &SwitchPlan,
    to_lc: &dyn InLc,
) -> Result<(), SwitchError> {
    let failed = |source| SwitchError::Check {
        to: plan.to.name.clone(),
        seen: format!(
            "from the checker: {}; in {}: {}",
            net.check_path(plan.service.addr),
            plan.to.name,
            to_lc.network_state(&plan.to.iface, plan.health.port)
        ),
        source: Box::new(source),
    };
    let mut hc = plan.health.expecting(&plan.to.identity);
    hc.patience = Duration::from_secs(1);
    net.check(plan.service.addr, &hc).map_err(failed)?;
    let sent_to = match plan.mode {
        Mode::Seamless => plan.to.address.addr,
        Mode::Path | Mode::Readdress => plan.service.addr,
    };
    let seen = net.check_neighbour(sent_to)?;
    if seen == Some(plan.to.mac) {
        return Ok(());
    }
    Err(failed(health::HealthError::OtherAnswerer {
        addr: sent_to,
        seen,
        lc: plan.to.name.clone(),
        want: plan.to.mac,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::testing::bed;
    use super::*;
    use crate::health::{HealthError, Probe};

    #[test]
    fn the_switch_checks_the_standby_with_the_configured_probe() {
        let mut b = bed(Mode::Readdress);
        b.plan.health.probe = Probe::Command {
            argv: vec!["pg_isready".into(), "-q".into()],
        };
        b.net = crate::fake::FakeNetwork::for_plan(&b.plan);
        b.switch().unwrap();
        let ops = b.net.ops();
        assert!(ops.contains(&"run b: pg_isready -q".to_string()), "{ops:?}");
        assert!(!ops.iter().any(|o| o.starts_with("b: get")), "{ops:?}");

        let mut b = bed(Mode::Readdress);
        b.plan.health.probe = Probe::Tcp;
        b.net = crate::fake::FakeNetwork::for_plan(&b.plan);
        b.switch().unwrap();
        let ops = b.net.ops();
        assert!(
            ops.contains(&"b: connect 10.0.0.3:8080".to_string()),
            "{ops:?}"
        );
        assert!(!ops.iter().any(|o| o.starts_with("b: get")), "{ops:?}");
    }

    #[test]
    fn only_a_standby_an_earlier_switch_drained_is_resumed_before_its_check() {
        let b = bed(Mode::Readdress);
        b.switch().unwrap();
        let ops = b.net.ops();
        assert!(!ops.iter().any(|o| o.starts_with("resume")), "{ops:?}");
        assert!(ops.contains(&"drain a".to_string()), "{ops:?}");
        let back = b.plan.reversed();
        assert!(back.resume_to);
        b.switch_by(&back).unwrap();
        let ops = b.net.ops();
        let at = |op: &str| {
            ops.iter()
                .rposition(|o| o == op)
                .unwrap_or_else(|| panic!("{op}: {ops:?}"))
        };
        assert!(
            at("resume a") < at("a: get 10.0.0.2:8080/version"),
            "{ops:?}"
        );
    }

    #[test]
    fn a_stranger_answering_the_check_through_the_service_address_rolls_the_switch_back() {
        for mode in [Mode::Path, Mode::Readdress, Mode::Seamless] {
            let b = bed(mode);
            let stranger = patchover_core::MacAddr([2, 0x66, 0x66, 0x66, 0x66, 0x66]);
            b.net.check_answered_by(stranger);
            let e = b.switch().unwrap_err();
            let SwitchError::RolledBack { cause, .. } = &e else {
                panic!("{mode}: {e:?}");
            };
            let text = patchover_core::error_chain(&**cause);
            assert!(
                text.contains("answered by 02:66:66:66:66:66")
                    && text.contains("not by b's NIC 02:00:00:00:00:0"),
                "{mode}: {text}"
            );
        }
    }

    #[test]
    fn a_command_check_that_fails_keeps_the_service_where_it_is_with_its_last_words() {
        let mut b = bed(Mode::Readdress);
        b.plan.health.probe = Probe::Command {
            argv: vec!["pg_isready".into()],
        };
        b.net = crate::fake::FakeNetwork::for_plan(&b.plan);
        b.net.service_down("b");
        let e = b.switch().unwrap_err();
        let SwitchError::StandbyNotReady { source, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(
            matches!(source, HealthError::Command { status: Some(1), answer, .. } if answer == "not ready"),
            "{source:?}"
        );
        assert!(
            source
                .to_string()
                .contains("`pg_isready` in fake LC b exited with 1"),
            "{source}"
        );
        assert!(
            !b.net.ops().iter().any(|o| o.starts_with("hold")),
            "nothing changed"
        );
    }
}
