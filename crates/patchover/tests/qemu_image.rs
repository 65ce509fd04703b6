//! `patchover image build-demo --qemu`: the image boots in real QEMU (TCG) as the QEMU
//! conventions say — the probe boot prints its marker and powers off, the full boot mounts the
//! system disk on / and the application disk on /data, the agent answers on the virtio-serial
//! port (also after a client left a response behind), and `poweroff` makes QEMU exit.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use patchover_agent::{AgentClient, Request, Response};

/// A QEMU process, killed on drop if still running.
struct Qemu {
    child: Child,
    console: PathBuf,
}

impl Qemu {
    fn boot(img: &Path, run: &Path, cmdline: &str, disks: bool) -> Qemu {
        fs::create_dir_all(run).unwrap();
        let console = run.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1"])
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(img.join("vmlinuz"))
            .arg("-initrd")
            .arg(img.join("initrd.img"))
            .args(["-append", cmdline]);
        if disks {
            for (node, file) in [("sys", "system.img"), ("app", "app.img")] {
                cmd.arg("-blockdev").arg(format!(
                    "driver=file,filename={},node-name={node}-file",
                    img.join(file).display()
                ));
                cmd.arg("-blockdev")
                    .arg(format!("driver=raw,file={node}-file,node-name={node}"));
                cmd.arg("-device").arg(format!(
                    "virtio-blk-pci,drive={node},id={node}-dev,serial={node}"
                ));
            }
            cmd.args(["-device", "virtio-serial-pci", "-chardev"])
                .arg(format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    run.join("agent.sock").display()
                ))
                .args([
                    "-device",
                    "virtserialport,chardev=agent,name=org.patchover.agent",
                ]);
        }
        let child = cmd
            .spawn()
            .expect("run qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Qemu { child, console }
    }

    fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for QEMU to exit; `None` if it still runs after `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exec(c: &mut AgentClient, argv: &[&str]) -> String {
    let req = Request::Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: 10_000,
    };
    match c.call(&req).unwrap() {
        Response::Exec {
            status: Some(0),
            stdout,
            ..
        } => stdout,
        other => panic!("{argv:?}: {other:?}"),
    }
}

const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet root=/dev/vda rw";

#[test]
fn qemu_demo_image_probes_boots_serves_the_agent_on_virtio_and_powers_off() {
    let dir = tempfile::Builder::new()
        .prefix("po-qemu-")
        .tempdir()
        .unwrap();
    let img = dir.path().join("img");
    let out = Command::new(common::BIN)
        .env("PATCHOVER_GUEST_DIR", common::guest_dir())
        .args(["--json", "image", "build-demo", "--qemu"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-demo --qemu: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules: Vec<&str> = built["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "virtio_blk",
        "virtio_console",
    ] {
        assert!(modules.contains(&m), "{m} missing from {modules:?}");
    }
    let pos = |m: &str| modules.iter().position(|x| *x == m).unwrap();
    assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_pci"));
    for f in ["vmlinuz", "initrd.img", "system.img", "app.img"] {
        assert!(img.join(f).is_file(), "{f} missing");
    }
    assert_eq!(fs::metadata(img.join("app.img")).unwrap().len(), 64 << 20);
    assert!(fs::metadata(img.join("system.img")).unwrap().len() >= 128 << 20);

    // The accelerator probe: the initramfs alone says it runs and powers off.
    let started = Instant::now();
    let mut probe = Qemu::boot(
        &img,
        &dir.path().join("probe"),
        &format!("{BASE_CMDLINE} patchover.probe=1"),
        false,
    );
    let status = probe.wait_exit(Duration::from_secs(90));
    let console = probe.console();
    assert!(
        status.is_some(),
        "the probe boot did not power off:\n{console}"
    );
    assert!(
        console.lines().any(|l| l.trim() == "PATCHOVER-PROBE-OK"),
        "no probe marker on the console:\n{console}"
    );
    eprintln!("TCG probe boot: {:?} to power-off", started.elapsed());

    // The full boot.
    let name = format!("polc{}", common::unique());
    let run = dir.path().join("run");
    let started = Instant::now();
    let mut vm = Qemu::boot(
        &img,
        &run,
        &format!("{BASE_CMDLINE} patchover.hostname={name} patchover.app=/dev/vdb,/data"),
        true,
    );
    let sock = run.join("agent.sock");
    let mut client = None;
    let pong = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            panic!(
                "QEMU ended ({s}) before the agent answered:\n{}",
                vm.console()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no answer from the agent in 180 s:\n{}",
            vm.console()
        );
        if client.is_none() && sock.exists() {
            client = AgentClient::connect_virtio(&sock, Duration::from_secs(1)).ok();
        }
        // Unanswered pings queue up; the answer to each is skipped but the last one's.
        if let Some(c) = client.as_mut()
            && let Ok(p) = c.call(&Request::Ping)
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let boot = started.elapsed();
    eprintln!("TCG boot to the agent's first answer: {boot:?}");
    let Response::Pong { hostname, .. } = pong else {
        panic!("{pong:?}")
    };
    assert_eq!(hostname, name);
    let mut c = client.unwrap();
    c.set_timeout(Duration::from_secs(15)).unwrap();

    let cmdline = exec(&mut c, &["cat", "/proc/cmdline"]);
    assert!(
        cmdline.contains(&format!("patchover.hostname={name}")),
        "{cmdline}"
    );
    let mounts = exec(&mut c, &["mount"]);
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("/dev/vda on / type ext4")),
        "{mounts}"
    );
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("/dev/vdb on /data type ext4")),
        "{mounts}"
    );
    let services = exec(&mut c, &["ps"]);
    assert!(services.contains("patchover-demo"), "{services}");
    assert_eq!(
        c.call(&Request::Report).unwrap(),
        Response::Report { report: None }
    );

    // A client that leaves before its answer: the answer waits in the port for the next client,
    // which must skip it.
    c.set_timeout(Duration::from_millis(200)).unwrap();
    let left = c.call(&Request::Exec {
        argv: vec!["sleep".into(), "1".into()],
        timeout_ms: 5_000,
    });
    assert!(left.is_err(), "sleep 1 answered within 200 ms: {left:?}");
    drop(c);
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = AgentClient::connect_virtio(&sock, Duration::from_secs(15)).unwrap();
    assert!(
        matches!(c.call(&Request::Ping).unwrap(), Response::Pong { .. }),
        "the next client gets its own answer"
    );
    assert_eq!(exec(&mut c, &["hostname"]).trim(), name);

    // poweroff from inside: busybox init stops the services and QEMU exits.
    let off = Instant::now();
    let _ = c.call(&Request::Exec {
        argv: vec!["poweroff".into()],
        timeout_ms: 5_000,
    });
    let status = vm.wait_exit(Duration::from_secs(20));
    let console = vm.console();
    assert!(
        status.is_some(),
        "QEMU still runs 20 s after poweroff:\n{console}"
    );
    assert!(status.unwrap().success(), "{status:?}\n{console}");
    eprintln!("poweroff to QEMU exit: {:?}", off.elapsed());
    assert!(
        !console.contains("PATCHOVER-INITRD-FAILED") && !console.contains("Kernel panic"),
        "{console}"
    );
}
