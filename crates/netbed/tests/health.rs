//! The service check against a real server in a real LC namespace (issue 20, the service
//! contract): a server that prints nothing about who it is passes, because patchover proves
//! which LC accepted the check's connection (made inside the LC, to its own address); another
//! LC answering is caught although it answers well; a check that never passes fails with its
//! last answer. Each test builds its own [`Testbed`] (unique namespaces, removed on drop).

mod guest;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use patchover_load::server::RefServer;
use patchover_net::health::{self, HealthError, Inside};
use patchover_net::{HealthCheck, InLc, LcAccess, Mode, Probe};
use patchover_netbed::testbed::{PORT, Testbed};

fn serve(netns: &Path) -> RefServer {
    // The reference server answers `GET /` with "hello" and `/health` with "ok": no identity.
    RefServer::start(
        Some(netns),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
        "any",
    )
    .expect("start the service")
}

fn check(path: &str) -> HealthCheck {
    HealthCheck {
        patience: Duration::from_millis(300),
        ..HealthCheck::new(PORT, path, "")
    }
}

/// Both ways into an LC: its namespace, and an agent channel as for a VM.
fn ways_in(tb: &Testbed, g: &guest::Guest) -> Vec<(&'static str, Box<dyn InLc>)> {
    vec![
        ("netns", tb.b.access.open().unwrap()),
        (
            "agent",
            LcAccess::Agent {
                socket: g.socket.clone(),
            }
            .open()
            .unwrap(),
        ),
    ]
}

fn guest_b(tb: &Testbed) -> guest::Guest {
    let sock = std::env::temp_dir().join(format!("po-health-{}-b.sock", tb.id));
    guest::Guest::start(&sock, tb.b.netns().unwrap())
}

#[test]
fn a_plain_http_server_passes_because_patchover_proves_which_lc_answered() {
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let _b = serve(tb.b.netns().unwrap());
    let g = guest_b(&tb);
    for (way, lc) in ways_in(&tb, &g) {
        let b = tb.b.address.addr;
        health::check_own(Inside::of(&*lc), &tb.b.iface, b, &check("/health"))
            .unwrap_or_else(|e| panic!("{way}: {e:?}"));
        // The status and the body text, when configured, are the service's part.
        let hc = HealthCheck {
            expect: "hello".into(),
            ..check("/")
        };
        health::check_own(Inside::of(&*lc), &tb.b.iface, b, &hc)
            .unwrap_or_else(|e| panic!("{way}: {e:?}"));
    }
}

#[test]
fn another_lc_answering_is_caught_although_it_answers_well() {
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let _a = serve(tb.a.netns().unwrap());
    let _b = serve(tb.b.netns().unwrap());
    let g = guest_b(&tb);
    for (way, lc) in ways_in(&tb, &g) {
        // From inside b, LC a's address answers 200 with the same body b would give: text
        // could not tell them apart.
        let a = tb.a.address.addr;
        health::check_in(Inside::of(&*lc), a, &check("/health"))
            .unwrap_or_else(|e| panic!("{way}: a answers: {e:?}"));
        let e = health::check_own(Inside::of(&*lc), &tb.b.iface, a, &check("/health")).unwrap_err();
        assert!(
            matches!(&e, HealthError::NotOwnAddress { addr, .. } if *addr == a),
            "{way}: {e:?}"
        );
        assert!(
            e.to_string().contains("another machine would answer"),
            "{way}: {e}"
        );
    }
}

#[test]
fn a_check_that_never_passes_fails_with_its_last_answer() {
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let _b = serve(tb.b.netns().unwrap());
    let lc = tb.b.access.open().unwrap();
    let b = tb.b.address.addr;
    let hc = HealthCheck {
        status: 204,
        ..check("/health")
    };
    let e = health::check_own(Inside::of(&*lc), &tb.b.iface, b, &hc).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, HealthError::Mismatch(_)), "{e:?}");
    assert!(
        text.contains("HTTP/1.1 200 OK") && text.contains("expected 204") && text.contains("ok"),
        "{text}"
    );
    // Nobody listening: the last answer is why none came.
    drop(_b);
    let e = health::check_own(Inside::of(&*lc), &tb.b.iface, b, &check("/health")).unwrap_err();
    assert!(
        format!("{:?}", e).contains("refused")
            || patchover_core::error_chain(&e).contains("refused"),
        "{e:?}"
    );
}

/// `kind = "tcp"`: a connect from inside the LC (its namespace, and busybox `nc` through an
/// agent) to its own address; refused while nothing listens, caught when the address is
/// another LC's although that one accepts.
#[test]
fn a_tcp_check_connects_inside_the_lc_to_its_own_address() {
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let g = guest_b(&tb);
    let tcp = HealthCheck {
        probe: Probe::Tcp,
        ..check("")
    };
    let (a, b) = (tb.a.address.addr, tb.b.address.addr);
    for (way, lc) in ways_in(&tb, &g) {
        let e = health::check_own(Inside::of(&*lc), &tb.b.iface, b, &tcp).unwrap_err();
        let chain = patchover_core::error_chain(&e);
        assert!(chain.contains("refused"), "{way}: {chain}");
    }
    let _a = serve(tb.a.netns().unwrap());
    let _b = serve(tb.b.netns().unwrap());
    for (way, lc) in ways_in(&tb, &g) {
        health::check_own(Inside::of(&*lc), &tb.b.iface, b, &tcp)
            .unwrap_or_else(|e| panic!("{way}: {e:?}"));
        health::check_in(Inside::of(&*lc), a, &tcp).unwrap_or_else(|e| panic!("{way}: {e:?}"));
        let e = health::check_own(Inside::of(&*lc), &tb.b.iface, a, &tcp).unwrap_err();
        assert!(
            matches!(&e, HealthError::NotOwnAddress { addr, .. } if *addr == a),
            "{way}: {e:?}"
        );
    }
}

/// A TLS server in an LC's namespace: `openssl s_server -www` (answers `GET /` with 200) with
/// a certificate for `svc.test` and `addr` signed by a CA of its own; killed on drop.
struct TlsServer {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl TlsServer {
    fn start(netns: &Path, addr: Ipv4Addr) -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ext = format!(
            "subjectAltName=DNS:svc.test,IP:{addr}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        );
        std::fs::write(d.join("ext.cnf"), ext).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (what, args) in [
            (
                "the CA",
                vec![
                    "req",
                    "-x509",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=po-test-ca",
                ],
            ),
            (
                "another CA",
                vec![
                    "req",
                    "-x509",
                    "-keyout",
                    "other.key",
                    "-out",
                    "other.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=po-other-ca",
                ],
            ),
            (
                "the request",
                vec![
                    "req",
                    "-keyout",
                    "srv.key",
                    "-out",
                    "srv.csr",
                    "-subj",
                    "/CN=svc.test",
                ],
            ),
            (
                "the certificate",
                vec![
                    "x509",
                    "-req",
                    "-in",
                    "srv.csr",
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    "srv.pem",
                    "-days",
                    "2",
                    "-extfile",
                    "ext.cnf",
                ],
            ),
        ] {
            let mut cmd = std::process::Command::new("openssl");
            cmd.args(&args).current_dir(d);
            if args[0] == "req" {
                cmd.args(ec);
            }
            let out = cmd.output().expect("openssl is needed");
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut cmd = patchover_net::netns::command_in(Some(netns), "openssl").unwrap();
        cmd.args(["s_server", "-quiet", "-www", "-accept", &PORT.to_string()])
            .args(["-cert", "srv.pem", "-key", "srv.key"])
            .current_dir(d)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        TlsServer {
            child: cmd.spawn().expect("start openssl s_server"),
            dir,
        }
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kind = "https"`: a GET over TLS from inside the LC to its own address, trusting a CA file
/// on the host or, with `insecure`, any certificate; a certificate of another CA or for
/// another name fails the check with the TLS error; a VM (through its agent) says it cannot.
#[test]
fn an_https_check_trusts_only_what_the_config_says() {
    use patchover_core::TlsTrust;
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let b = tb.b.address.addr;
    let srv = TlsServer::start(tb.b.netns().unwrap(), b);
    let lc = tb.b.access.open().unwrap();
    let https = |ca: Option<&str>, insecure: bool, sni: Option<&str>| HealthCheck {
        probe: Probe::Https(TlsTrust {
            ca_file: ca.map(|f| srv.file(f)),
            insecure,
            sni: sni.map(str::to_owned),
        }),
        patience: Duration::from_secs(3),
        ..check("/")
    };
    for (hc, what) in [
        (https(None, true, None), "insecure"),
        (
            https(Some("ca.pem"), false, None),
            "the CA, the address's IP SAN",
        ),
        (
            https(Some("ca.pem"), false, Some("svc.test")),
            "the CA and the name",
        ),
    ] {
        health::check_own(Inside::of(&*lc), &tb.b.iface, b, &hc)
            .unwrap_or_else(|e| panic!("{what}: {}", patchover_core::error_chain(&e)));
    }
    // The same check from outside the LC (the switch's check through an address, from the
    // host's namespace).
    health::check(
        Some(&tb.host_netns),
        b,
        &https(Some("ca.pem"), false, None),
        None,
    )
    .unwrap_or_else(|e| panic!("from the host: {}", patchover_core::error_chain(&e)));
    let quick = |hc: HealthCheck| HealthCheck {
        patience: Duration::from_millis(300),
        ..hc
    };
    for (hc, want) in [
        (https(Some("other.pem"), false, None), "UnknownIssuer"),
        (
            https(Some("ca.pem"), false, Some("other.test")),
            "not valid for name \"other.test\"",
        ),
    ] {
        let e = health::check_own(Inside::of(&*lc), &tb.b.iface, b, &quick(hc)).unwrap_err();
        let chain = patchover_core::error_chain(&e);
        assert!(chain.contains(want), "{want}: {chain}");
    }
    let g = guest_b(&tb);
    let agent = LcAccess::Agent {
        socket: g.socket.clone(),
    }
    .open()
    .unwrap();
    let e = health::check_in(Inside::of(&*agent), b, &quick(https(None, true, None))).unwrap_err();
    let chain = patchover_core::error_chain(&e);
    assert!(
        chain.contains("https check inside a VM is not done yet"),
        "{chain}"
    );
}

/// The switch's check through the service address (from the host) proves who answered: a
/// stranger on the bridge answering 200 on the service address fails it, naming the
/// stranger's MAC and the standby's; the standby holding the address passes.
#[test]
fn a_stranger_answering_the_check_through_the_service_address_is_caught() {
    use patchover_net::{LiveNetwork, switch::check_through};
    use patchover_netbed::testbed::Stranger;
    let tb = Testbed::new(Mode::Readdress).unwrap();
    let _a = serve(tb.a.netns().unwrap());
    let mut plan = tb.plan(false);
    plan.health = check("/health");
    plan.to.identity.clear();
    // As the switch checks from the bridge's namespace: through the bridge.
    let net = LiveNetwork::open(Some(&tb.host_netns), None)
        .unwrap()
        .checking_via(&tb.bridge);
    let to_lc = tb.a.access.open().unwrap();
    // a holds the service address and the plan's standby is a: proven.
    check_through(&net, &plan, &*to_lc)
        .unwrap_or_else(|e| panic!("{}", patchover_core::error_chain(&e)));
    // a lets the address go, a stranger takes it and answers as well as a would.
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    let a_ns =
        tb.a.netns()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
    let svc = tb.service.to_string();
    ip(&["-n", &a_ns, "addr", "del", &svc, "dev", &tb.a.iface]);
    let stranger = Stranger::claim(&tb, &svc);
    let _s = serve(&stranger.netns());
    let h_ns = tb
        .host_netns
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    ip(&[
        "-n",
        &h_ns,
        "neigh",
        "flush",
        "to",
        &tb.service.addr.to_string(),
    ]);
    plan.health.patience = Duration::from_secs(3);
    let e = check_through(&net, &plan, &*to_lc).unwrap_err();
    let text = patchover_core::error_chain(&e);
    assert!(
        text.contains("answered by 02:66:66:66:66:66")
            && text.contains(&format!("not by {}'s NIC {}", tb.a.name, tb.a.mac)),
        "{text}"
    );
}
