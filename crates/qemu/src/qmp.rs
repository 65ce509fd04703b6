//! A small blocking QMP client.
//!
//! QMP is line-delimited JSON over a Unix socket: QEMU greets (`{"QMP":{…}}`), the client
//! negotiates capabilities (`qmp_capabilities`), then sends commands tagged with an `id` and gets
//! either `{"return":…,"id":N}` or `{"error":{"class":…,"desc":…},"id":N}`. Asynchronous events
//! (`{"event":…,"data":…,"timestamp":…}`) may arrive at any moment, between or before replies.
//!
//! Callers are synchronous (the lifecycle code runs one step after another), so the API blocks.
//! One reader thread owns the read half of the socket and turns every line into a message on a
//! channel; the caller's thread writes commands and waits on that channel with a deadline. This
//! keeps three properties simple:
//!
//! - **a hung QEMU never hangs the caller**: every wait has a deadline ([`Qmp::set_timeout`]) and
//!   a reply that comes after it is recognised by its stale `id` and dropped;
//! - **no event is lost**: events that arrive while a command waits go to a queue that
//!   [`Qmp::wait_event`] and [`Qmp::drain_events`] read;
//! - **QEMU exiting is an error of its own** ([`QmpError::Eof`]), not a timeout.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};

/// Events kept at most; the oldest is dropped beyond this (with a warning). Callers that wait for
/// events take them out of the queue, and [`Qmp::drain_events`] empties it.
const MAX_QUEUED_EVENTS: usize = 4096;

/// How often a refused connection is retried while [`Qmp::connect`] waits for QEMU to listen.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Why a QMP call failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "cannot connect to QMP socket {path} (waited {waited:?}): the VM may not be running; check that QEMU runs with -qmp unix:{path},server=on"
    )]
    Connect {
        path: PathBuf,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    #[error(
        "QMP command {cmd} got no answer within {after:?}: QEMU stopped answering on {path} (hung or overloaded)"
    )]
    Timeout {
        cmd: String,
        after: Duration,
        path: PathBuf,
    },
    #[error("no QMP event matched within {after:?} on {path}")]
    EventTimeout { after: Duration, path: PathBuf },
    #[error("QMP protocol error on {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("QMP command {cmd} failed: {class}: {desc}")]
    Command {
        cmd: String,
        class: String,
        desc: String,
    },
    #[error("QEMU closed the QMP connection {path}: QEMU has exited (see its log)")]
    Eof { path: PathBuf },
    #[error("cannot send QMP command {cmd} on {path}")]
    Send {
        cmd: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `SHUTDOWN`, `BLOCK_JOB_READY`, `JOB_STATUS_CHANGE`, …
    pub name: String,
    /// The event's `data` (`Value::Null` when QEMU sent none).
    pub data: Value,
    /// When QEMU emitted it (its own clock), if it said.
    pub timestamp: Option<SystemTime>,
}

impl Event {
    /// The job this event is about: `data.device` for `BLOCK_JOB_*` events (which name the job
    /// `device` for historical reasons), `data.id` for `JOB_STATUS_CHANGE`.
    pub fn job_id(&self) -> Option<&str> {
        if self.name.starts_with("BLOCK_JOB_") {
            self.data.get("device").and_then(Value::as_str)
        } else if self.name == "JOB_STATUS_CHANGE" {
            self.data.get("id").and_then(Value::as_str)
        } else {
            None
        }
    }

    /// A string field of `data`.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// The VM's run state, as `query-status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Shutdown,
    Prelaunch,
    InMigrate,
    PostMigrate,
    FinishMigrate,
    SaveVm,
    RestoreVm,
    Suspended,
    Watchdog,
    GuestPanicked,
    InternalError,
    IoError,
    Debug,
    Colo,
    /// A state this client does not know (a newer QEMU).
    Other(String),
}

impl RunState {
    /// Parses QEMU's `RunState` string.
    pub fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "shutdown" => RunState::Shutdown,
            "prelaunch" => RunState::Prelaunch,
            "inmigrate" => RunState::InMigrate,
            "postmigrate" => RunState::PostMigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "save-vm" => RunState::SaveVm,
            "restore-vm" => RunState::RestoreVm,
            "suspended" => RunState::Suspended,
            "watchdog" => RunState::Watchdog,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            "debug" => RunState::Debug,
            "colo" => RunState::Colo,
            other => RunState::Other(other.to_string()),
        }
    }
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJob {
    /// The job id (QMP calls it `device`).
    pub device: String,
    /// `mirror`, `commit`, `stream`, `backup`, …
    #[serde(rename = "type")]
    pub job_type: String,
    /// Work to do, in bytes (grows when the source is written during a mirror).
    pub len: u64,
    /// Work done, in bytes.
    pub offset: u64,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub speed: u64,
    #[serde(default)]
    pub io_status: String,
    /// For a mirror: source and target are in sync and the job may be completed or cut.
    #[serde(default)]
    pub ready: bool,
    /// The job status (`running`, `ready`, `standby`, `concluded`, …).
    #[serde(default)]
    pub status: String,
    /// Set once the job has failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// How a mirror treats guest writes while it copies (chosen at start; QEMU 7.2 has no
/// `block-job-change` to switch a running job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Guest writes only mark the area dirty; the job copies it later. Cheap for the guest, but
    /// the job may never converge when the guest writes faster than the copy.
    Background,
    /// Once an area is copied, a guest write completes only when it is on the target too. Always
    /// converges, at the cost of slower guest writes.
    WriteBlocking,
}

impl CopyMode {
    /// The QMP `MirrorCopyMode` string.
    pub fn as_qmp(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// What the reader thread saw on the socket.
enum Incoming {
    Greeting(Value),
    Reply {
        id: Option<u64>,
        result: Result<Value, (String, String)>,
    },
    Event(Event),
    Bad(String),
    Eof,
}

/// A connected, negotiated QMP session. Dropping it closes the socket (QEMU keeps running).
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    rx: Receiver<Incoming>,
    reader: Option<JoinHandle<()>>,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
    closed: bool,
    greeting: Value,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until it accepts or `timeout` has passed
    /// (QEMU creates the socket a moment after it starts), reads the greeting and negotiates
    /// capabilities. `timeout` is also the initial per-call timeout (see [`Qmp::set_timeout`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Self::open(path, timeout, timeout)
    }

    /// [`Qmp::connect`] to a monitor that listens now or not at all (one attempt: a QEMU that
    /// is not running is not waited for); `timeout` is for the greeting and each reply.
    pub fn connect_now(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Self::open(path, Duration::ZERO, timeout)
    }

    fn open(path: &Path, wait: Duration, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(CONNECT_RETRY),
            }
        };
        let connect_err = |source| QmpError::Connect {
            path: path.to_path_buf(),
            waited: start.elapsed(),
            source,
        };
        let read_half = stream.try_clone().map_err(connect_err)?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(read_half, tx))
            .map_err(connect_err)?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            writer: stream,
            rx,
            reader: Some(reader),
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            closed: false,
            greeting: Value::Null,
        };
        qmp.greeting = qmp.wait_greeting()?;
        qmp.execute("qmp_capabilities", Value::Null)?;
        tracing::debug!(path = %path.display(), "QMP connected");
        Ok(qmp)
    }

    /// The greeting QEMU sent (`{"QMP":{"version":…,"capabilities":…}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long [`Qmp::execute`] waits for a reply before [`QmpError::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The current per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn wait_greeting(&mut self) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.recv(deadline) {
                Some(Incoming::Greeting(g)) => return Ok(g),
                Some(Incoming::Event(e)) => self.push_event(e),
                Some(Incoming::Reply { .. }) => {
                    return Err(self.protocol("a reply came before the greeting"));
                }
                Some(Incoming::Bad(detail)) => return Err(self.protocol(&detail)),
                Some(Incoming::Eof) => return Err(self.eof()),
                None => {
                    return Err(QmpError::Timeout {
                        cmd: "(greeting)".into(),
                        after: self.timeout,
                        path: self.path.clone(),
                    });
                }
            }
        }
    }

    /// Runs `cmd` with `args` (`Value::Null` for none) and returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        if self.closed {
            return Err(self.eof());
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        // A QEMU that stopped reading fills the socket buffer: bound the write too.
        let _ = self
            .writer
            .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))));
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    self.closed = true;
                    self.eof()
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout {
                    cmd: cmd.to_string(),
                    after: self.timeout,
                    path: self.path.clone(),
                },
                _ => QmpError::Send {
                    cmd: cmd.to_string(),
                    path: self.path.clone(),
                    source: e,
                },
            });
        }
        tracing::trace!(cmd, id, "QMP command sent");
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.recv(deadline) {
                Some(Incoming::Reply {
                    id: Some(rid),
                    result,
                }) if rid == id => {
                    return result.map_err(|(class, desc)| QmpError::Command {
                        cmd: cmd.to_string(),
                        class,
                        desc,
                    });
                }
                Some(Incoming::Reply { id: rid, .. }) => {
                    // A reply to a call that timed out earlier.
                    tracing::debug!(?rid, waiting_for = id, "QMP: stale reply dropped");
                }
                Some(Incoming::Event(e)) => self.push_event(e),
                Some(Incoming::Greeting(_)) => {
                    return Err(self.protocol("a second greeting arrived"));
                }
                Some(Incoming::Bad(detail)) => return Err(self.protocol(&detail)),
                Some(Incoming::Eof) => return Err(self.eof()),
                None => {
                    return Err(QmpError::Timeout {
                        cmd: cmd.to_string(),
                        after: self.timeout,
                        path: self.path.clone(),
                    });
                }
            }
        }
    }

    /// Waits until an event matching `pred` is in the queue, takes it out and returns it. Events
    /// already queued are looked at first (oldest first); non-matching events stay queued.
    pub fn wait_event(
        &mut self,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        self.pump();
        if let Some(pos) = self.events.iter().position(&pred) {
            return Ok(self.events.remove(pos).expect("position is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.closed {
                return Err(self.eof());
            }
            match self.recv(deadline) {
                Some(Incoming::Event(e)) if pred(&e) => return Ok(e),
                Some(Incoming::Event(e)) => self.push_event(e),
                Some(Incoming::Reply { id, .. }) => {
                    tracing::debug!(?id, "QMP: stale reply dropped");
                }
                Some(Incoming::Greeting(_)) => {
                    return Err(self.protocol("a second greeting arrived"));
                }
                Some(Incoming::Bad(detail)) => return Err(self.protocol(&detail)),
                Some(Incoming::Eof) => return Err(self.eof()),
                None => {
                    return Err(QmpError::EventTimeout {
                        after: timeout,
                        path: self.path.clone(),
                    });
                }
            }
        }
    }

    /// Every event received so far (including those that arrived since the last call), oldest
    /// first; the queue is left empty.
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.pump();
        self.events.drain(..).collect()
    }

    /// Drops the queued events matching `pred` (e.g. the leftovers of a finished job).
    pub fn discard_events(&mut self, pred: impl Fn(&Event) -> bool) {
        self.pump();
        self.events.retain(|e| !pred(e));
    }

    /// True once QEMU has closed the connection.
    pub fn is_closed(&mut self) -> bool {
        self.pump();
        self.closed
    }

    // ---- typed helpers -------------------------------------------------------------------

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunState, QmpError> {
        let r = self.execute("query-status", Value::Null)?;
        match r.get("status").and_then(Value::as_str) {
            Some(s) => Ok(RunState::parse(s)),
            None => Err(self.protocol(&format!("query-status returned no status: {r}"))),
        }
    }

    /// `stop`: pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", Value::Null).map(drop)
    }

    /// `cont`: resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", Value::Null).map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button (the guest decides what to do).
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", Value::Null).map(drop)
    }

    /// `quit`: QEMU exits at once. QEMU closing the socket before or after its reply counts as
    /// success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", Value::Null) {
            Ok(_) | Err(QmpError::Eof { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `blockdev-add` with `options` (a `BlockdevOptions` object).
    pub fn blockdev_add(&mut self, options: Value) -> Result<(), QmpError> {
        self.execute("blockdev-add", options).map(drop)
    }

    /// `blockdev-del` of the node `node`.
    pub fn blockdev_del(&mut self, node: &str) -> Result<(), QmpError> {
        self.execute("blockdev-del", json!({ "node-name": node }))
            .map(drop)
    }

    /// `device_add` with `options` (`{"driver":…,"id":…,…}`).
    pub fn device_add(&mut self, options: Value) -> Result<(), QmpError> {
        self.execute("device_add", options).map(drop)
    }

    /// `device_del` of `id`. The removal completes later, with the guest's cooperation, and is
    /// reported by the `DEVICE_DELETED` event.
    pub fn device_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute("device_del", json!({ "id": id })).map(drop)
    }

    /// `netdev_add` with `options` (`{"type":"tap","id":…,…}`).
    pub fn netdev_add(&mut self, options: Value) -> Result<(), QmpError> {
        self.execute("netdev_add", options).map(drop)
    }

    /// `netdev_del` of `id`.
    pub fn netdev_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute("netdev_del", json!({ "id": id })).map(drop)
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&mut self) -> Result<Vec<BlockJob>, QmpError> {
        let r = self.execute("query-block-jobs", Value::Null)?;
        serde_json::from_value(r.clone())
            .map_err(|e| self.protocol(&format!("query-block-jobs returned {r}: {e}")))
    }

    /// `blockdev-mirror` of node `device` onto the already added node `target`, `sync: full`,
    /// job id `job_id`, at most `speed` bytes/s (0: no limit), auto-finalize and auto-dismiss on
    /// (the job disappears once it ends).
    pub fn blockdev_mirror(
        &mut self,
        job_id: &str,
        device: &str,
        target: &str,
        copy_mode: CopyMode,
        speed: u64,
    ) -> Result<(), QmpError> {
        self.blockdev_mirror_granular(job_id, device, target, copy_mode, speed, None)
    }

    /// [`Qmp::blockdev_mirror`] with the dirty-tracking `granularity` in bytes (a power of 2,
    /// 512 B–64 MiB; `None`: QEMU's default, the target's cluster size or 64 KiB). A guest
    /// write dirties a whole granule, which the background copy then copies again.
    pub fn blockdev_mirror_granular(
        &mut self,
        job_id: &str,
        device: &str,
        target: &str,
        copy_mode: CopyMode,
        speed: u64,
        granularity: Option<u32>,
    ) -> Result<(), QmpError> {
        let mut args = json!({
            "job-id": job_id,
            "device": device,
            "target": target,
            "sync": "full",
            "copy-mode": copy_mode.as_qmp(),
            "speed": speed,
            "auto-finalize": true,
            "auto-dismiss": true,
        });
        if let Some(g) = granularity {
            args["granularity"] = json!(g);
        }
        self.execute("blockdev-mirror", args).map(drop)
    }

    /// `block-job-cancel`. On a mirror that is ready, a non-forced cancel ends the job with the
    /// target holding a point-in-time copy (event `BLOCK_JOB_COMPLETED`); `force` abandons it.
    pub fn block_job_cancel(&mut self, id: &str, force: bool) -> Result<(), QmpError> {
        self.execute("block-job-cancel", json!({ "device": id, "force": force }))
            .map(drop)
    }

    /// `block-job-set-speed`: limits job `id` to `speed` bytes/s (0: no limit).
    pub fn block_job_set_speed(&mut self, id: &str, speed: u64) -> Result<(), QmpError> {
        self.execute(
            "block-job-set-speed",
            json!({ "device": id, "speed": speed }),
        )
        .map(drop)
    }

    /// `block-job-complete`: for a mirror, pivots the guest onto the target.
    pub fn block_job_complete(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute("block-job-complete", json!({ "device": id }))
            .map(drop)
    }

    /// `human-monitor-command`: runs an HMP command line and returns its output.
    pub fn human_monitor_command(&mut self, command_line: &str) -> Result<String, QmpError> {
        let r = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    // ---- internals -----------------------------------------------------------------------

    /// Next message, or `None` at the deadline.
    fn recv(&mut self, deadline: Instant) -> Option<Incoming> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(Incoming::Eof) | Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Some(Incoming::Eof)
            }
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// Moves what the reader has already received into the queue, without waiting.
    fn pump(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Incoming::Event(e)) => self.push_event(e),
                Ok(Incoming::Eof) | Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
                Ok(Incoming::Reply { id, .. }) => {
                    tracing::debug!(?id, "QMP: stale reply dropped");
                }
                Ok(Incoming::Greeting(_)) | Ok(Incoming::Bad(_)) => {
                    tracing::warn!(path = %self.path.display(), "QMP: unexpected message dropped");
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    fn push_event(&mut self, e: Event) {
        tracing::trace!(event = %e.name, data = %e.data, "QMP event");
        if self.events.len() >= MAX_QUEUED_EVENTS {
            let old = self.events.pop_front();
            tracing::warn!(dropped = ?old.map(|e| e.name), "QMP event queue full: oldest event dropped");
        }
        self.events.push_back(e);
    }

    fn protocol(&self, detail: &str) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    fn eof(&self) -> QmpError {
        QmpError::Eof {
            path: self.path.clone(),
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // Unblocks the reader thread's read_line.
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("queued_events", &self.events.len())
            .field("closed", &self.closed)
            .finish()
    }
}

fn read_loop(stream: UnixStream, tx: Sender<Incoming>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Incoming::Eof);
                return;
            }
            Ok(_) => {}
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if tx.send(parse_line(text)).is_err() {
            return; // the Qmp was dropped
        }
    }
}

/// Classifies one line from QEMU.
fn parse_line(text: &str) -> Incoming {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Incoming::Bad(format!("not JSON ({e}): {text:.200}")),
    };
    let Value::Object(mut m) = v else {
        return Incoming::Bad(format!("not a JSON object: {text:.200}"));
    };
    if let Some(name) = m.get("event").and_then(Value::as_str) {
        let timestamp = m.get("timestamp").and_then(|t| {
            let secs = t.get("seconds")?.as_u64()?;
            let us = t.get("microseconds")?.as_u64()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(us))
        });
        return Incoming::Event(Event {
            name: name.to_string(),
            data: m.remove("data").unwrap_or(Value::Null),
            timestamp,
        });
    }
    let id = m.get("id").and_then(Value::as_u64);
    if let Some(r) = m.remove("return") {
        return Incoming::Reply { id, result: Ok(r) };
    }
    if let Some(err) = m.get("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("?");
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
        return Incoming::Reply {
            id,
            result: Err((class.to_string(), desc.to_string())),
        };
    }
    if let Some(g) = m.remove("QMP") {
        return Incoming::Greeting(g);
    }
    Incoming::Bad(format!("unknown message: {text:.200}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reply_error_event_and_garbage() {
        match parse_line(r#"{"return": {"status": "running"}, "id": 7}"#) {
            Incoming::Reply {
                id: Some(7),
                result: Ok(v),
            } => assert_eq!(v["status"], "running"),
            _ => panic!("reply not recognised"),
        }
        match parse_line(r#"{"error": {"class": "GenericError", "desc": "nope"}, "id": 3}"#) {
            Incoming::Reply {
                id: Some(3),
                result: Err((c, d)),
            } => assert_eq!((c.as_str(), d.as_str()), ("GenericError", "nope")),
            _ => panic!("error not recognised"),
        }
        match parse_line(
            r#"{"timestamp": {"seconds": 10, "microseconds": 5}, "event": "BLOCK_JOB_READY", "data": {"device": "m"}}"#,
        ) {
            Incoming::Event(e) => {
                assert_eq!(e.name, "BLOCK_JOB_READY");
                assert_eq!(e.job_id(), Some("m"));
                assert_eq!(
                    e.timestamp,
                    Some(SystemTime::UNIX_EPOCH + Duration::from_micros(10_000_005))
                );
            }
            _ => panic!("event not recognised"),
        }
        assert!(matches!(parse_line("{nope"), Incoming::Bad(_)));
        assert!(matches!(parse_line("[1]"), Incoming::Bad(_)));
        assert!(matches!(parse_line(r#"{"x":1}"#), Incoming::Bad(_)));
    }

    #[test]
    fn run_states_parse() {
        assert_eq!(RunState::parse("running"), RunState::Running);
        assert_eq!(RunState::parse("paused"), RunState::Paused);
        assert_eq!(RunState::parse("finish-migrate"), RunState::FinishMigrate);
        assert_eq!(RunState::parse("new"), RunState::Other("new".into()));
    }

    #[test]
    fn block_job_parses_qemu_7_2_output() {
        let v: Value = serde_json::from_str(
            r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "len": 68157440, "offset": 68157440, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror"}]"#,
        )
        .unwrap();
        let jobs: Vec<BlockJob> = serde_json::from_value(v).unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].ready);
        assert_eq!(jobs[0].job_type, "mirror");
        assert_eq!(jobs[0].len, 68157440);
        assert_eq!(jobs[0].error, None);
    }
}
