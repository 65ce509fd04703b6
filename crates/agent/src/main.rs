//! `patchover-agent`: runs inside an LC, statically linked so that it runs in any rootfs.
//!
//! `patchover-agent serve` answers the host on the agent channel (see the library's docs);
//! the LC's boot scripts start it. Without a socket argument it serves on the virtio-serial
//! port named `org.patchover.agent` when the LC has one (QEMU), else on the Unix socket.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use patchover_agent::{
    GUEST_SOCKET_DIR, Request, Response, SOCKET_NAME, VIRTIO_PORTS_DIR, find_virtio_port,
    read_line, serve_envelopes,
};

/// Where the patch execution script works: the table copy, the bundles, the keys, the report.
const AGENT_DIR: &str = patchover_bundle::table::AGENT_DIR;

fn report_path() -> PathBuf {
    Path::new(AGENT_DIR).join(patchover_agent::apply::REPORT_FILE)
}

use patchover_core::error_chain as chain;
const MAX_OUTPUT: usize = 1024 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("serve") => {
            let virtio = match args.get(1) {
                Some(_) => None,
                None => find_virtio_port(Path::new(VIRTIO_PORTS_DIR)),
            };
            let socket = args
                .get(1)
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(GUEST_SOCKET_DIR).join(SOCKET_NAME));
            let served = match &virtio {
                Some(port) => serve_virtio(port),
                None => serve(&socket),
            };
            match served {
                Ok(()) => 0,
                Err(e) => {
                    let on = virtio.as_ref().unwrap_or(&socket);
                    eprintln!("patchover-agent: cannot serve on {}: {e}", on.display());
                    1
                }
            }
        }
        Some("apply-patches") => {
            let dir = args.get(1).map_or(PathBuf::from(AGENT_DIR), PathBuf::from);
            match patchover_agent::apply::apply_patches(&dir, Path::new("/")) {
                Ok(r) => {
                    for b in &r.report.bundles {
                        eprintln!("patchover-agent: {} {}", b.id, b.status.as_str());
                    }
                    i32::from(!r.all_ok)
                }
                Err(e) => {
                    eprintln!("patchover-agent: apply-patches: {}", chain(&e));
                    1
                }
            }
        }
        Some("post-checks") => {
            let dir = args.get(1).map_or(PathBuf::from(AGENT_DIR), PathBuf::from);
            match patchover_agent::apply::post_checks(&dir, Path::new("/")) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    i32::from(!r.passed)
                }
                Err(e) => {
                    eprintln!("patchover-agent: post-checks: {}", chain(&e));
                    2
                }
            }
        }
        Some("--version") => {
            println!("patchover-agent {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!(
                "usage: patchover-agent serve [SOCKET] | apply-patches [DIR] | post-checks [DIR]"
            );
            2
        }
    };
    std::process::exit(code);
}

fn serve(socket: &Path) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    eprintln!("patchover-agent: serving on {}", socket.display());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = handle(conn);
        });
    }
    Ok(())
}

/// Serves envelopes on the virtio port until the port fails, reopening it after a failure
/// (e.g. a device reset); gives up only when it cannot be opened at all.
fn serve_virtio(port: &Path) -> std::io::Result<()> {
    loop {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(port)?;
        eprintln!("patchover-agent: serving on {}", port.display());
        let e = serve_envelopes(&dev, &dev, answer, Duration::from_millis(20));
        eprintln!("patchover-agent: {}: {e}; reopening", port.display());
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn handle(conn: UnixStream) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    while let Ok(Some(line)) = read_line(&mut reader) {
        let resp = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => answer(req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        writer.write_all(&out)?;
    }
    Ok(())
}

fn answer(req: Request) -> Response {
    match req {
        Request::Ping => Response::Pong {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            uptime_s: init_uptime().unwrap_or(-1.0),
            pids: pids(),
        },
        Request::Exec { argv, timeout_ms } => exec(&argv, Duration::from_millis(timeout_ms)),
        Request::Report => match std::fs::read(report_path()) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => Response::Report { report: Some(v) },
                Err(e) => Response::Error {
                    message: format!("the report at {} is not JSON: {e}", report_path().display()),
                },
            },
            Err(_) => Response::Report { report: None },
        },
    }
}

/// Seconds since PID 1 of this LC started: its start time in clock ticks against the
/// system uptime.
fn init_uptime() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/1/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // The clock tick is 100 Hz on every Linux architecture patchover runs on.
    Some(uptime - start_ticks / 100.0)
}

fn pids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn exec(argv: &[String], timeout: Duration) -> Response {
    let Some((prog, rest)) = argv.split_first() else {
        return Response::Error {
            message: "exec needs a program".to_owned(),
        };
    };
    let child = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Response::Error {
                message: format!("cannot run {prog:?}: {e}"),
            };
        }
    };
    let (out_t, err_t) = (capture(child.stdout.take()), capture(child.stderr.take()));
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Response::Error {
                    message: format!("waiting for {prog:?}: {e}"),
                };
            }
        }
    };
    Response::Exec {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        timed_out,
    }
}

fn capture(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(r) = r {
            let _ = std::io::Read::read_to_end(&mut r.take(MAX_OUTPUT as u64), &mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}
