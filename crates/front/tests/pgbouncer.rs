//! The front against a real PgBouncer 1.18 and real PostgreSQL 15 clusters on the loopback
//! (Debian's packages; root, since both run as `postgres`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use patchover_front::process::{BouncerSpec, PgBouncerProcess, ScratchPostgres, free_port};
use patchover_front::wire::{Conn, Login};
use patchover_front::{Front, FrontError, PgBouncer};

struct Bed {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    pg: Option<ScratchPostgres>,
    pg_port: u16,
    bouncer: PgBouncerProcess,
}

fn bed() -> Bed {
    let tmp = tempfile::tempdir().unwrap();
    // The postgres user walks into it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().to_owned();
    let pg_port = free_port().unwrap();
    let pg = ScratchPostgres::start(&dir.join("pg1"), pg_port).unwrap();
    let bouncer = PgBouncerProcess::start(&BouncerSpec {
        dir: &dir.join("bouncer"),
        port: free_port().unwrap(),
        target: ([127, 0, 0, 1], pg_port).into(),
        databases: &["postgres"],
        server_user: "postgres",
        pool_size: 4,
    })
    .unwrap();
    Bed {
        _tmp: tmp,
        dir,
        pg: Some(pg),
        pg_port,
        bouncer,
    }
}

impl Bed {
    fn front(&self, deadline: Duration) -> PgBouncer {
        PgBouncer {
            admin: self.bouncer.addr(),
            user: "pgbouncer".into(),
            password: None,
            database: None,
            pause_deadline: deadline,
        }
    }

    fn client(&self) -> Login<'static> {
        Login {
            addr: self.bouncer.addr(),
            user: "postgres",
            database: "postgres",
            password: None,
            timeout: Duration::from_secs(30),
        }
    }

    fn service(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.pg_port).into()
    }
}

/// The cluster a query through the front ran on.
fn system_id(conn: &mut Conn) -> String {
    let rows = conn
        .query("SELECT system_identifier::text FROM pg_control_system()")
        .unwrap();
    rows.rows[0][0].clone().unwrap()
}

#[test]
fn the_front_checks_its_target_and_says_what_is_wrong() {
    let bed = bed();
    let front = bed.front(Duration::from_secs(5));
    let version = front.check(bed.service()).unwrap();
    assert!(version.starts_with("PgBouncer 1."), "{version}");
    let elsewhere: SocketAddr = "10.9.9.9:5432".parse().unwrap();
    let e = front.check(elsewhere).unwrap_err();
    assert!(matches!(e, FrontError::WrongTarget { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "database postgres points at 127.0.0.1:{}",
            bed.pg_port
        )) && msg.contains("would not follow the switch"),
        "{msg}"
    );
    let one_db = PgBouncer {
        database: Some("app".into()),
        ..front.clone()
    };
    let e = one_db.check(bed.service()).unwrap_err();
    assert!(e.to_string().contains("has no pool for app"), "{e}");
    // Not paused: resume has nothing to do, and says so.
    assert!(!front.resume().unwrap());
}

#[test]
fn held_transactions_run_on_the_new_server_after_release() {
    let mut bed = bed();
    let front = bed.front(Duration::from_secs(5));
    let mut c = Conn::connect(&bed.client()).unwrap();
    let before = system_id(&mut c);
    front.pause().unwrap();
    // The client's next transaction is held, on its own session.
    let held = std::thread::spawn(move || {
        let t0 = Instant::now();
        let id = system_id(&mut c);
        (id, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !held.is_finished(),
        "a transaction ran while the front was paused"
    );
    // "The switch": the old server goes, another cluster answers at the same address.
    drop(bed.pg.take());
    let pg2 = ScratchPostgres::start(&bed.dir.join("pg2"), bed.pg_port).unwrap();
    front.release().unwrap();
    let (after, waited) = held.join().unwrap();
    assert_ne!(after, before, "the held transaction ran on the new cluster");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(!front.resume().unwrap(), "release resumed it");
    drop(pg2);
}

#[test]
fn a_transaction_longer_than_the_pause_deadline_is_waited_for_then_the_pause_is_undone() {
    let bed = bed();
    let front = bed.front(Duration::from_millis(800));
    let mut c = Conn::connect(&bed.client()).unwrap();
    c.query("CREATE TABLE t (id int)").unwrap();
    let long = std::thread::spawn(move || {
        c.query("BEGIN").unwrap();
        c.query("INSERT INTO t VALUES (1)").unwrap();
        std::thread::sleep(Duration::from_secs(2));
        c.query("COMMIT").unwrap();
        c
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let e = front.pause().unwrap_err();
    assert!(
        t0.elapsed() >= Duration::from_millis(700) && t0.elapsed() < Duration::from_secs(3),
        "{:?}",
        t0.elapsed()
    );
    assert!(matches!(e, FrontError::PauseTimeout { .. }), "{e:?}");
    assert!(
        e.to_string().contains("within 800ms")
            && e.to_string().contains("it was resumed, nothing changed"),
        "{e}"
    );
    // The long transaction commits, and the front serves new ones.
    let mut c = long.join().unwrap();
    let n = c.query("SELECT count(*)::text FROM t").unwrap();
    assert_eq!(n.rows[0][0].as_deref(), Some("1"));
    assert!(!front.resume().unwrap(), "not left paused");
}

/// Issue 21: the command a run that could not let the front go names (`resume_command`),
/// run by an operator's shell, lets the held clients go.
#[test]
fn the_resume_command_of_a_front_left_paused_lets_its_clients_go() {
    let bed = bed();
    let front = bed.front(Duration::from_secs(5));
    let mut c = Conn::connect(&bed.client()).unwrap();
    let before = system_id(&mut c);
    front.pause().unwrap();
    let held = std::thread::spawn(move || system_id(&mut c));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!held.is_finished(), "held by the pause");
    let command = front.resume_command();
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    assert_eq!(held.join().unwrap(), before);
    assert!(!front.resume().unwrap(), "the command resumed it");
}
