//! Links made, plugged, moved and removed through `Rtnl`, as root, each test in a network
//! namespace of its own (made by `unshare(2)` on the test's thread): whatever a test leaves
//! goes with the namespace when the thread and its connection end, even on a panic.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, unshare};
use patchover_core::{Ipv4Cidr, MacAddr};
use patchover_netlink::rtnl::{Rtnl, RtnlError};

/// Runs `f` on a thread in a new, empty network namespace, with a connection opened there.
fn in_fresh_netns(f: impl FnOnce(&Rtnl) + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare a network namespace (needs root)");
            let rtnl = Rtnl::open(None).unwrap();
            f(&rtnl);
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    });
}

fn os_error(e: &RtnlError) -> Option<i32> {
    e.raw_os_error()
}

#[test]
fn a_bridge_a_veth_with_its_peer_mac_and_a_tap_are_made_plugged_and_deleted() {
    in_fresh_netns(|r| {
        r.add_bridge("pobr").unwrap();
        let br = r.need_link("pobr").unwrap();
        assert!(br.up, "a new bridge is up");
        let again = r.add_bridge("pobr").unwrap_err();
        assert_eq!(os_error(&again), Some(libc::EEXIST), "{again:?}");
        assert!(
            patchover_core::error_chain(&again).contains("\"pobr\""),
            "{}",
            patchover_core::error_chain(&again)
        );

        let mac = MacAddr([0x02, 0x50, 0x4f, 0, 0, 7]);
        r.add_veth("pov0", "pov1", mac).unwrap();
        assert_eq!(r.need_link("pov1").unwrap().mac, Some(mac));
        let v0 = r.need_link("pov0").unwrap();
        assert_eq!((v0.controller, v0.up), (None, false));
        r.attach("pov0", "pobr").unwrap();
        let v0 = r.need_link("pov0").unwrap();
        assert_eq!((v0.controller, v0.up), (Some(br.index), true));

        // Persistent: still there once `create` closed its /dev/net/tun descriptor.
        r.add_tap("potap").unwrap();
        let tap = r.need_link("potap").unwrap();
        assert_eq!((tap.controller, tap.up), (None, false));
        r.set_up_by_name("potap").unwrap();
        assert!(r.need_link("potap").unwrap().up);

        assert!(r.delete("pov0").unwrap());
        assert!(r.link("pov1").unwrap().is_none(), "the peer goes with it");
        assert!(
            !r.delete("pov0").unwrap(),
            "deleting a missing link is fine"
        );
        assert!(r.delete("potap").unwrap());
        assert!(r.link("potap").unwrap().is_none());
    });
}

#[test]
fn a_request_on_a_missing_link_names_it_and_keeps_enodev() {
    in_fresh_netns(|r| {
        r.add_bridge("pobr").unwrap();
        for e in [
            r.attach("ponone", "pobr").unwrap_err(),
            r.set_up_by_name("ponone").unwrap_err(),
            r.attach("pobr", "ponobr").unwrap_err(),
        ] {
            let text = patchover_core::error_chain(&e);
            assert_eq!(os_error(&e), Some(libc::ENODEV), "{text}");
            assert!(text.contains("\"pono"), "{text}");
        }
        let bad = r.add_tap("a/b").unwrap_err();
        assert_eq!(os_error(&bad), Some(libc::EINVAL));
        assert!(patchover_core::error_chain(&bad).contains("\"a/b\""));
    });
}

/// A `sleep` in a network namespace of its own, killed on drop.
struct Elsewhere(Child);

impl Elsewhere {
    fn start() -> Elsewhere {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .unwrap();
        let e = Elsewhere(child);
        // `unshare` joins its namespace before it execs sleep: wait until it has.
        let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let start = Instant::now();
        while std::fs::read_link(format!("/proc/{}/ns/net", e.0.id())).ok() == Some(mine.clone()) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "unshare never ran"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        e
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_veth_end_moves_into_the_namespace_of_a_process() {
    in_fresh_netns(|r| {
        let other = Elsewhere::start();
        r.add_veth("pom0", "pom1", MacAddr([0x02, 0, 0, 0, 0, 9]))
            .unwrap();
        r.move_to_netns_of("pom1", other.0.id()).unwrap();
        assert!(r.link("pom1").unwrap().is_none(), "moved away");
        assert!(r.link("pom0").unwrap().is_some());
        let e = r.move_to_netns_of("pom1", other.0.id()).unwrap_err();
        assert_eq!(os_error(&e), Some(libc::ENODEV));
    });
}

#[test]
fn a_nic_is_renamed_addressed_and_given_a_default_route() {
    in_fresh_netns(|r| {
        r.add_veth("porn0", "porn1", MacAddr([0x02, 0, 0, 0, 0, 5]))
            .unwrap();
        r.rename("porn0", "eth7").unwrap();
        assert!(r.link("porn0").unwrap().is_none());
        let i = r.need_link("eth7").unwrap().index;
        let cidr: Ipv4Cidr = "10.77.5.2/24".parse().unwrap();
        r.add_address(i, cidr).unwrap();
        r.add_address(i, cidr).unwrap();
        assert_eq!(r.addresses(i).unwrap(), vec![cidr], "added once");
        r.set_up(i, true).unwrap();
        r.set_up_by_name("porn1").unwrap();
        let gw = "10.77.5.1".parse().unwrap();
        r.add_default_route(gw, i).unwrap();
        let again = r.add_default_route(gw, i).unwrap_err();
        assert_eq!(os_error(&again), Some(libc::EEXIST), "the route is there");
        let gone = r.rename("porn0", "eth8").unwrap_err();
        assert_eq!(os_error(&gone), Some(libc::ENODEV));
        assert!(patchover_core::error_chain(&gone).contains("porn0"));
    });
}
