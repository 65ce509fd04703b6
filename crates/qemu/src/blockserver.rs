//! A block server on the host: `qemu-storage-daemon` (QSD) serving image disks through QEMU's
//! block layer, each as a FUSE export file that the host loop-mounts.
//!
//! Why: the `ns` copier traps writes with fanotify, which says *which file* was written but not
//! *where*, so a cut has to hash whole files (a 1 GiB database costs ~300 ms of freeze). QEMU's
//! block layer keeps a real dirty bitmap: served by QSD, an `ns` LC's image disk can be copied
//! live by QEMU's block jobs ([`crate::BitmapCopy`]; not by `blockdev-mirror`, which QEMU 7.2
//! refuses on a writable FUSE export, see [`crate::backup`]). This kernel has no
//! device-mapper, nbd or ublk, but it has FUSE, and QSD's FUSE export is a regular file that
//! `mount -o loop` accepts.
//!
//! Layout of one server, all under names the caller gives:
//! - nodes as in the QEMU conventions: file node `<node>-file`, format node `<node>` (`sys`,
//!   `app`, `disk<N>`), export id `export-<node>`, the export mounted over the caller's file;
//! - two QMP monitors: the *control* socket `<state_dir>/qsd-control.sock`, which this module
//!   connects to per operation, and the caller's *jobs* socket (for an LC,
//!   [`crate::backend::jobs_socket`]) for copy jobs that hold a connection for minutes;
//! - `<state_dir>/qsd.pid`, `<state_dir>/qsd.log` (QSD's start-up errors) and
//!   `<state_dir>/blockserver.json` (the served disks, so a new patchover can [`BlockServer::adopt`]
//!   the server: QSD is daemonized, not patchover's child, and outlives it).
//!
//! **Loop devices over an export must be buffered (no `--direct-io=on`).** QEMU 7.2's FUSE
//! export reads every request into one buffer, and a write that waits for the block layer
//! polls the event loop, which may read the *next* request into that same buffer before the
//! write has reached the image (fixed upstream in 2025, "fuse: Copy write buffer content before
//! polling"). Direct I/O through a loop device sends requests in parallel and corrupts the image
//! within seconds (measured here: `losetup --direct-io=on` + ext4 → fsck errors; `dd
//! oflag=direct bs=4M` → wrong data). A buffered loop device's worker sends one request at a
//! time and waits for its answer, so requests never overlap: nothing else may open the export
//! file while it is mounted. Buffered is also what gives the writer its throughput: its writes
//! end in the page cache, and FUSE's write-through sends them to QSD in the background of the
//! loop worker (see docs/blockserver.md for the figures).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::qmp::{Qmp, QmpError};

/// The QSD program when the caller does not name one.
pub const DEFAULT_PROGRAM: &str = "qemu-storage-daemon";
/// How long QMP calls (and the start-up) may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// One image served by the block server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedDisk {
    /// The format node's name (`sys`, `app`, `disk<N>`); the file node is `<node>-file`.
    pub node: String,
    /// The raw (or `.qcow2`) image.
    pub image: PathBuf,
    /// Where the FUSE export appears: a regular file, created (empty) when missing, in a
    /// directory that must exist.
    pub export: PathBuf,
}

impl ServedDisk {
    pub fn new(node: &str, image: impl Into<PathBuf>, export: impl Into<PathBuf>) -> ServedDisk {
        ServedDisk {
            node: node.to_owned(),
            image: image.into(),
            export: export.into(),
        }
    }

    fn file_node(&self) -> String {
        format!("{}-file", self.node)
    }

    fn export_id(&self) -> String {
        format!("export-{}", self.node)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct BlockServerSpec {
    /// The program (`qemu-storage-daemon`, or a path).
    pub program: PathBuf,
    /// An existing directory for the pid file, the control socket, the log and the manifest.
    pub state_dir: PathBuf,
    /// The monitor for block jobs (mirrors).
    pub jobs_socket: PathBuf,
    pub disks: Vec<ServedDisk>,
}

impl BlockServerSpec {
    pub fn new(
        state_dir: impl Into<PathBuf>,
        jobs_socket: impl Into<PathBuf>,
        disks: Vec<ServedDisk>,
    ) -> BlockServerSpec {
        BlockServerSpec {
            program: PathBuf::from(DEFAULT_PROGRAM),
            state_dir: state_dir.into(),
            jobs_socket: jobs_socket.into(),
            disks,
        }
    }
}

/// Why a block server step failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockServerError {
    #[error("{program} not found: apt-get install qemu-system-common")]
    NotInstalled { program: PathBuf },
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("qemu-storage-daemon did not start ({status}): {log}")]
    StartFailed { status: String, log: String },
    #[error("block server state {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("block server: {step}")]
    Qmp {
        step: String,
        #[source]
        source: QmpError,
    },
    #[error("disk {node}: the image {path} does not exist: check the disk's path")]
    ImageMissing { node: String, path: PathBuf },
    #[error(
        "disk {node}: the export's directory {dir} does not exist: create it first (exports are files the server mounts over)"
    )]
    ExportDirMissing { node: String, dir: PathBuf },
    #[error(
        "disk {node}: the export path {path} exists and is not a regular file: give a file path"
    )]
    ExportNotFile { node: String, path: PathBuf },
    #[error(
        "disk {node}: bad node name (1-31 of a-z 0-9 -, starting with a letter, e.g. sys, app, disk1)"
    )]
    BadNode { node: String },
    #[error("disk {node}: this block server already serves a node of that name: remove it first")]
    NodeInUse { node: String },
    #[error(
        "disk {node}: the image {path} is in use by another process (QEMU's image lock): stop the LC or VM that has it open"
    )]
    ImageLocked {
        node: String,
        path: PathBuf,
        desc: String,
    },
    #[error(
        "disk {node}: the export {export} is in use by {device}: unmount it (and detach the loop device) first"
    )]
    ExportInUse {
        node: String,
        export: PathBuf,
        device: String,
    },
    #[error("disk {node}: this block server serves no such node")]
    NoSuchNode { node: String },
    #[error(
        "no block server runs for {state_dir} (no live qemu-storage-daemon named in its pid file)"
    )]
    NotRunning { state_dir: PathBuf },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
}

fn state_err(path: &Path) -> impl FnOnce(io::Error) -> BlockServerError + use<> {
    let path = path.to_path_buf();
    move |source| BlockServerError::State { path, source }
}

fn qmp_err(step: impl Into<String>) -> impl FnOnce(QmpError) -> BlockServerError {
    let step = step.into();
    move |source| BlockServerError::Qmp { step, source }
}

/// The manifest kept in `<state_dir>/blockserver.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Manifest {
    pid: i32,
    jobs_socket: PathBuf,
    disks: Vec<ServedDisk>,
    /// Export files this server created (removed when their export goes).
    created_exports: Vec<PathBuf>,
}

/// A running QSD. Not stopped on drop: it serves an LC's disks beyond patchover's lifetime.
/// End it with [`BlockServer::stop`].
#[derive(Debug)]
pub struct BlockServer {
    state_dir: PathBuf,
    manifest: Manifest,
    stopped: bool,
}

impl BlockServer {
    /// Starts QSD daemonized with its two monitors, then serves every disk of `spec` (see
    /// [`BlockServer::add`]). On any failure the server is stopped and every export file it
    /// created removed.
    pub fn start(spec: &BlockServerSpec) -> Result<BlockServer, BlockServerError> {
        let dir = &spec.state_dir;
        if !dir.is_dir() {
            return Err(BlockServerError::State {
                path: dir.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such directory"),
            });
        }
        // Check the disks before starting anything: the common mistakes fail without a process.
        for (i, d) in spec.disks.iter().enumerate() {
            check_disk(d)?;
            if spec.disks[..i].iter().any(|o| o.node == d.node) {
                return Err(BlockServerError::NodeInUse {
                    node: d.node.clone(),
                });
            }
        }
        let control = control_socket(dir);
        let pid_file = dir.join("qsd.pid");
        let log_file = dir.join("qsd.log");
        for stale in [&control, &spec.jobs_socket, &pid_file] {
            let _ = fs::remove_file(stale);
        }
        let log = fs::File::create(&log_file).map_err(state_err(&log_file))?;
        let monitor = |id: &str, path: &Path| {
            [
                "--chardev".to_owned(),
                format!("socket,id={id},path={},server=on,wait=off", path.display()),
                "--monitor".to_owned(),
                format!("chardev={id}"),
            ]
        };
        let status = Command::new(&spec.program)
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&pid_file)
            .args(monitor("control", &control))
            .args(monitor("jobs", &spec.jobs_socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    BlockServerError::NotInstalled {
                        program: spec.program.clone(),
                    }
                } else {
                    BlockServerError::Spawn {
                        program: spec.program.clone(),
                        source,
                    }
                }
            })?;
        if !status.success() {
            let mut log = String::new();
            let _ = fs::File::open(&log_file).and_then(|mut f| f.read_to_string(&mut log));
            return Err(BlockServerError::StartFailed {
                status: status.to_string(),
                log: log.trim().to_owned(),
            });
        }
        let pid = read_pid(&pid_file)?;
        let mut server = BlockServer {
            state_dir: dir.clone(),
            manifest: Manifest {
                pid,
                jobs_socket: spec.jobs_socket.clone(),
                disks: Vec::new(),
                created_exports: Vec::new(),
            },
            stopped: false,
        };
        tracing::info!(pid, state_dir = %dir.display(), "block server: started");
        let served = server
            .save()
            .and_then(|()| spec.disks.iter().try_for_each(|d| server.add(d)));
        if let Err(e) = served {
            tracing::warn!(error = %e, "block server: start failed, stopping it");
            if let Err(e2) = server.stop(Duration::from_secs(5)) {
                tracing::warn!(error = %e2, "block server: stop after a failed start");
            }
            return Err(e);
        }
        Ok(server)
    }

    /// Finds the server a previous patchover started for `state_dir`: its pid file must name a
    /// live `qemu-storage-daemon` that answers on the control socket.
    pub fn adopt(state_dir: &Path) -> Result<BlockServer, BlockServerError> {
        let not_running = || BlockServerError::NotRunning {
            state_dir: state_dir.to_path_buf(),
        };
        let path = manifest_path(state_dir);
        let manifest: Manifest = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| state_err(&path)(io::Error::new(io::ErrorKind::InvalidData, e)))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_running()),
            Err(e) => return Err(state_err(&path)(e)),
        };
        let pid = read_pid(&state_dir.join("qsd.pid")).map_err(|_| not_running())?;
        if pid != manifest.pid || !is_qsd(pid) {
            return Err(not_running());
        }
        let server = BlockServer {
            state_dir: state_dir.to_path_buf(),
            manifest,
            stopped: false,
        };
        let mut qmp = server.control()?;
        let exports = qmp
            .execute("query-block-exports", Value::Null)
            .map_err(qmp_err("query-block-exports"))?;
        for d in &server.manifest.disks {
            let listed = exports.as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["id"].as_str() == Some(d.export_id().as_str()))
            });
            if !listed {
                tracing::warn!(node = %d.node, "block server: adopted server lacks an export of its manifest");
            }
        }
        tracing::info!(pid, state_dir = %state_dir.display(), "block server: adopted");
        Ok(server)
    }

    /// Serves `disk`: `blockdev-add` of its file and format nodes, then a writable FUSE export
    /// over `disk.export` (created empty if missing). Undone on failure.
    pub fn add(&mut self, disk: &ServedDisk) -> Result<(), BlockServerError> {
        check_disk(disk)?;
        if self.manifest.disks.iter().any(|d| d.node == disk.node) {
            return Err(BlockServerError::NodeInUse {
                node: disk.node.clone(),
            });
        }
        if image_write_locked(&disk.image) {
            return Err(BlockServerError::ImageLocked {
                node: disk.node.clone(),
                path: disk.image.clone(),
                desc: "another QEMU holds its write lock".into(),
            });
        }
        let mut qmp = self.control()?;
        let created = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&disk.export)
        {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(state_err(&disk.export)(e)),
        };
        let r = add_nodes(&mut qmp, disk);
        if let Err(e) = r {
            if created {
                let _ = fs::remove_file(&disk.export);
            }
            return Err(e);
        }
        self.manifest.disks.push(disk.clone());
        if created {
            self.manifest.created_exports.push(disk.export.clone());
        }
        tracing::info!(node = %disk.node, image = %disk.image.display(),
            export = %disk.export.display(), "block server: serving");
        self.save()
    }

    /// Stops serving `node`: the export goes (`block-export-del`, waiting for
    /// `BLOCK_EXPORT_DELETED`), then its nodes (`blockdev-del`), then the export file if this
    /// server created it. Refused while the export is loop-mounted.
    pub fn remove(&mut self, node: &str) -> Result<(), BlockServerError> {
        let Some(i) = self.manifest.disks.iter().position(|d| d.node == node) else {
            return Err(BlockServerError::NoSuchNode {
                node: node.to_owned(),
            });
        };
        let disk = self.manifest.disks[i].clone();
        if let Some(device) = loop_user(&disk.export) {
            return Err(BlockServerError::ExportInUse {
                node: disk.node.clone(),
                export: disk.export.clone(),
                device,
            });
        }
        let mut qmp = self.control()?;
        del_export(&mut qmp, &disk)?;
        for n in [disk.node.clone(), disk.file_node()] {
            match qmp.blockdev_del(&n) {
                Ok(()) => {}
                Err(QmpError::Command { desc, .. }) if desc.contains("Failed to find node") => {}
                Err(e) => return Err(qmp_err(format!("blockdev-del {n}"))(e)),
            }
        }
        self.manifest.disks.remove(i);
        self.forget_export(&disk.export);
        tracing::info!(node, "block server: no longer serving");
        self.save()
    }

    /// Ends the server: refused while an export is loop-mounted; else QMP `quit` (QSD unmounts
    /// its exports), a wait of `timeout` for the process to end, then SIGKILL (and a lazy
    /// unmount of exports it left). The export files it created, the sockets, the pid file and
    /// the manifest are removed.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), BlockServerError> {
        if self.stopped {
            return Ok(());
        }
        for d in &self.manifest.disks {
            if let Some(device) = loop_user(&d.export) {
                return Err(BlockServerError::ExportInUse {
                    node: d.node.clone(),
                    export: d.export.clone(),
                    device,
                });
            }
        }
        let pid = self.manifest.pid;
        match self.control_if_running() {
            Ok(None) => tracing::info!(pid, "block server: already gone"),
            Ok(Some(mut q)) => {
                if let Err(e) = q.quit() {
                    tracing::warn!(pid, error = %e, "block server: quit failed; killing it");
                }
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "block server: no control monitor; killing it")
            }
        }
        if !wait_gone(pid, timeout) {
            tracing::warn!(pid, "block server: did not quit in time; SIGKILL");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_gone(pid, Duration::from_secs(5));
        }
        // A killed QSD leaves its FUSE mounts behind (ENOTCONN on every access).
        for d in &self.manifest.disks {
            if is_mount_point(&d.export) {
                let _ = nix::mount::umount2(&d.export, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        for p in std::mem::take(&mut self.manifest.created_exports) {
            let _ = fs::remove_file(p);
        }
        let dir = &self.state_dir;
        for f in [
            control_socket(dir),
            self.manifest.jobs_socket.clone(),
            dir.join("qsd.pid"),
            manifest_path(dir),
        ] {
            let _ = fs::remove_file(f);
        }
        self.manifest.disks.clear();
        self.stopped = true;
        tracing::info!(pid, "block server: stopped");
        Ok(())
    }

    /// QSD's process id.
    pub fn pid(&self) -> i32 {
        self.manifest.pid
    }

    /// The monitor for block jobs (give it to [`Qmp::connect`] for a [`crate::Mirror`]).
    pub fn jobs_socket(&self) -> &Path {
        &self.manifest.jobs_socket
    }

    /// The disks served now, in the order added.
    pub fn disks(&self) -> &[ServedDisk] {
        &self.manifest.disks
    }

    /// True while QSD runs (false after [`BlockServer::stop`] or when it died).
    pub fn is_running(&self) -> bool {
        !self.stopped && is_qsd(self.manifest.pid)
    }

    /// The control monitor, or `None` when QSD is not running (no wait for a dead socket).
    fn control_if_running(&self) -> Result<Option<Qmp>, BlockServerError> {
        if !is_qsd(self.manifest.pid) {
            return Ok(None);
        }
        self.control().map(Some)
    }

    fn control(&self) -> Result<Qmp, BlockServerError> {
        Qmp::connect(&control_socket(&self.state_dir), QMP_TIMEOUT)
            .map_err(qmp_err("connecting to the control monitor"))
    }

    fn forget_export(&mut self, export: &Path) {
        if let Some(j) = self
            .manifest
            .created_exports
            .iter()
            .position(|p| p == export)
        {
            let p = self.manifest.created_exports.remove(j);
            let _ = fs::remove_file(p);
        }
    }

    fn save(&self) -> Result<(), BlockServerError> {
        let path = manifest_path(&self.state_dir);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&self.manifest).expect("the manifest serializes");
        fs::write(&tmp, body)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(state_err(&path))
    }
}

fn control_socket(dir: &Path) -> PathBuf {
    dir.join("qsd-control.sock")
}

fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("blockserver.json")
}

/// The checks that need no server: a valid node name, the image there, the export's directory
/// there and the export path a file if it exists.
fn check_disk(d: &ServedDisk) -> Result<(), BlockServerError> {
    let n = &d.node;
    let valid = (1..=31).contains(&n.len())
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.ends_with("-file");
    if !valid {
        return Err(BlockServerError::BadNode { node: n.clone() });
    }
    if !d.image.is_file() {
        return Err(BlockServerError::ImageMissing {
            node: n.clone(),
            path: d.image.clone(),
        });
    }
    let dir = match d.export.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(BlockServerError::ExportDirMissing {
            node: n.clone(),
            dir: dir.to_path_buf(),
        });
    }
    if let Ok(m) = fs::metadata(&d.export)
        && !m.is_file()
    {
        return Err(BlockServerError::ExportNotFile {
            node: n.clone(),
            path: d.export.clone(),
        });
    }
    Ok(())
}

/// `blockdev-add` file + format node, then `block-export-add`; each step undone if a later one
/// fails.
fn add_nodes(qmp: &mut Qmp, d: &ServedDisk) -> Result<(), BlockServerError> {
    let image = fs::canonicalize(&d.image).map_err(state_err(&d.image))?;
    let file_node = d.file_node();
    let classify = |step: &str, e: QmpError| match &e {
        QmpError::Command { desc, .. } if desc.contains("Duplicate") => {
            BlockServerError::NodeInUse {
                node: d.node.clone(),
            }
        }
        QmpError::Command { desc, .. } if desc.contains("lock") => BlockServerError::ImageLocked {
            node: d.node.clone(),
            path: d.image.clone(),
            desc: desc.clone(),
        },
        _ => qmp_err(format!("{step} for disk {}", d.node))(e),
    };
    qmp.blockdev_add(json!({
        "driver": "file",
        "filename": image,
        "node-name": file_node,
        // QEMU's own write-back cache is the host page cache: a flush from the loop device
        // (syncfs in the LC) reaches the image with fdatasync.
        "cache": { "direct": false, "no-flush": false },
    }))
    .map_err(|e| classify("blockdev-add (file)", e))?;
    let undo_file = |qmp: &mut Qmp| {
        let _ = qmp.blockdev_del(&file_node);
    };
    if let Err(e) = qmp.blockdev_add(json!({
        "driver": crate::backend::image_format(&d.image),
        "file": file_node,
        "node-name": d.node,
    })) {
        undo_file(qmp);
        return Err(classify("blockdev-add (format)", e));
    }
    if let Err(e) = qmp.execute(
        "block-export-add",
        json!({
            "type": "fuse",
            "id": d.export_id(),
            "node-name": d.node,
            "mountpoint": d.export,
            "writable": true,
        }),
    ) {
        let _ = qmp.blockdev_del(&d.node);
        undo_file(qmp);
        return Err(classify("block-export-add (fuse)", e));
    }
    Ok(())
}

/// `block-export-del` and the wait for `BLOCK_EXPORT_DELETED` (the export ends asynchronously,
/// and its node stays busy until then).
fn del_export(qmp: &mut Qmp, d: &ServedDisk) -> Result<(), BlockServerError> {
    let id = d.export_id();
    match qmp.execute("block-export-del", json!({ "id": id })) {
        Ok(_) => {}
        // Already gone.
        Err(QmpError::Command { desc, .. }) if desc.contains("not found") => return Ok(()),
        Err(e) => return Err(qmp_err(format!("block-export-del {id}"))(e)),
    }
    qmp.wait_event(
        |e| e.name == "BLOCK_EXPORT_DELETED" && e.str("id") == Some(id.as_str()),
        QMP_TIMEOUT,
    )
    .map_err(qmp_err(format!("waiting for export {id} to end")))?;
    Ok(())
}

/// True when another QEMU process writes `image` or forbids writers, by QEMU's own image locks
/// (open file description locks on byte 100 + permission bit, 200 + unshared bit; WRITE is
/// bit 1). QSD's exports share every permission, so QEMU itself would let two servers write
/// one image: this check refuses it.
fn image_write_locked(image: &Path) -> bool {
    use nix::fcntl::{FcntlArg, fcntl};
    let Ok(f) = fs::File::open(image) else {
        return false;
    };
    [101, 201].into_iter().any(|byte| {
        let mut fl = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        };
        fcntl(&f, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok() && fl.l_type != nix::libc::F_UNLCK as i16
    })
}

fn read_pid(path: &Path) -> Result<i32, BlockServerError> {
    let s = fs::read_to_string(path).map_err(state_err(path))?;
    s.trim().parse().map_err(|_| {
        state_err(path)(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a pid: {:?}", s.trim()),
        ))
    })
}

/// True when `pid` is a live (not zombie) qemu-storage-daemon.
fn is_qsd(pid: i32) -> bool {
    let alive = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    });
    alive
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-storage-daemon"))
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_qsd(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(p) = fs::canonicalize(path) else {
        // A dead FUSE mount fails stat with ENOTCONN: it is one.
        return fs::symlink_metadata(path)
            .is_err_and(|e| e.raw_os_error() == Some(libc_enotconn()));
    };
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(4).map(unescape_mount) == Some(p.clone()))
    })
}

const fn libc_enotconn() -> i32 {
    nix::errno::Errno::ENOTCONN as i32
}

fn unescape_mount(s: &str) -> PathBuf {
    PathBuf::from(
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\"),
    )
}

/// The loop device whose backing file is `export`, if any.
pub fn loop_user(export: &Path) -> Option<String> {
    let want = fs::canonicalize(export).unwrap_or_else(|_| export.to_path_buf());
    let entries = fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim_end_matches('\n')) == want
        {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

/// A filesystem image (an export file, or a copy) mounted through a buffered loop device;
/// unmounted on drop (the loop device goes with it).
#[derive(Debug)]
pub struct LoopMount {
    file: PathBuf,
    at: PathBuf,
    mounted: bool,
}

/// How long an unmount waits for its loop device to go: the kernel clears an autoclear loop
/// device after the last close, asynchronously, so right after `umount` the file can still
/// show as in use (a `remove` of the export then refused it: seen once in a loaded test run).
const LOOP_RELEASE: Duration = Duration::from_secs(5);

impl LoopMount {
    /// `mount -o loop,nosuid,nodev[,ro] file at`. Buffered (never `--direct-io`): see the
    /// module docs. The image is the LC's, written by whatever runs in it: no set-user-ID
    /// program or device node on it takes effect (it is the LC's application disk, so it
    /// stays executable inside the LC).
    pub fn mount(file: &Path, at: &Path, read_only: bool) -> Result<LoopMount, BlockServerError> {
        let opts = if read_only {
            "loop,nosuid,nodev,ro"
        } else {
            "loop,nosuid,nodev"
        };
        run(
            Command::new("mount").args(["-o", opts]).arg(file).arg(at),
            &format!("mount -o {opts} {} {}", file.display(), at.display()),
        )?;
        Ok(LoopMount {
            file: file.to_path_buf(),
            at: at.to_path_buf(),
            mounted: true,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.at
    }

    /// Unmounts now (the drop does it too, ignoring errors).
    /// Returns once the loop device is gone too (or after [`LOOP_RELEASE`]).
    pub fn unmount(mut self) -> Result<(), BlockServerError> {
        self.mounted = false;
        run(
            Command::new("umount").arg(&self.at),
            &format!("umount {}", self.at.display()),
        )?;
        self.wait_released();
        Ok(())
    }

    fn wait_released(&self) {
        let start = Instant::now();
        while loop_user(&self.file).is_some() && start.elapsed() < LOOP_RELEASE {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.at)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.at).status();
            }
            self.wait_released();
        }
    }
}

fn run(c: &mut Command, what: &str) -> Result<(), BlockServerError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BlockServerError::Command {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BlockServerError::Command {
            what: what.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `syncfs(2)` on the filesystem holding `path`: ext4 writes back and flushes its device, so
/// through a loop device over an export every write so far is in QSD's block layer.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let f = fs::File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_and_paths_are_checked_before_anything_runs() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        fs::write(&img, b"x").unwrap();
        let ok = ServedDisk::new("app", &img, d.path().join("app.export"));
        check_disk(&ok).unwrap();
        for bad in ["", "App", "1a", "a_b", "sys-file", &"a".repeat(32)] {
            let e = check_disk(&ServedDisk::new(bad, &img, d.path().join("e"))).unwrap_err();
            assert!(matches!(e, BlockServerError::BadNode { .. }), "{bad}: {e}");
        }
        let e = check_disk(&ServedDisk::new(
            "app",
            d.path().join("nope.img"),
            d.path().join("e"),
        ))
        .unwrap_err();
        assert!(matches!(e, BlockServerError::ImageMissing { .. }), "{e}");
        let e = check_disk(&ServedDisk::new("app", &img, d.path().join("no/such/e"))).unwrap_err();
        assert!(
            matches!(e, BlockServerError::ExportDirMissing { .. }),
            "{e}"
        );
        let e = check_disk(&ServedDisk::new("app", &img, d.path())).unwrap_err();
        assert!(matches!(e, BlockServerError::ExportNotFile { .. }), "{e}");
    }

    #[test]
    fn missing_program_says_what_to_install() {
        let d = tempfile::tempdir().unwrap();
        let mut spec = BlockServerSpec::new(d.path(), d.path().join("jobs.sock"), vec![]);
        spec.program = PathBuf::from("/nonexistent/qemu-storage-daemon");
        let e = BlockServer::start(&spec).unwrap_err();
        assert!(matches!(e, BlockServerError::NotInstalled { .. }), "{e}");
        assert!(
            e.to_string().contains("apt-get install qemu-system-common"),
            "{e}"
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount("/plain"), PathBuf::from("/plain"));
    }
}
