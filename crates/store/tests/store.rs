use std::path::Path;

use patchover_core::{Category, Config, HostFacts};
use patchover_store::{FeedStateRow, NewPatch, PatchResult, Role, Store, StoreError};

fn config(extra_lc: bool) -> Config {
    let mut text = String::from(
        r#"
[[lc]]
id = "lc1"
cpu_share = 50
memory_mib = 128
system_disk = { path = "/srv/lc1/sys" }
app_disk = { path = "/srv/lc1/app" }
nic = [{ name = "eth0", address = "10.77.0.10/24" }]
"#,
    );
    if extra_lc {
        text.push_str(
            "[[lc]]\nid = \"lc2\"\ncpu_share = 50\nmemory_mib = 128\nsystem_disk = { path = \"/srv/lc2/sys\" }\n",
        );
    }
    Config::parse(
        Path::new("t.toml"),
        &text,
        &HostFacts {
            cpus: 2,
            memory_mib: 4096,
        },
    )
    .unwrap()
}

#[test]
fn resource_table_mirrors_config_and_keeps_roles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), 5);
    s.sync_lcs(&config(true).lcs).unwrap();
    assert_eq!(s.lcs().unwrap().len(), 2);
    s.set_role("lc1", Role::Active).unwrap();
    drop(s);

    // Reopen (migrations are idempotent), drop lc2 from the config: the row goes, lc1 keeps its role.
    let mut s = Store::open(&path).unwrap();
    s.sync_lcs(&config(false).lcs).unwrap();
    let rows = s.lcs().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].role, Role::Active);
    assert_eq!(rows[0].spec.memory_mib, 128);
    assert!(s.lc("lc2").unwrap().is_none());
    assert!(matches!(
        s.set_role("nope", Role::Active),
        Err(StoreError::NotFound(_))
    ));
}

/// Every CLI call and API request opens the store and syncs the config's LCs into it: with
/// the config unchanged that must not write, nor wait for the write lock another process
/// holds (a run journaling its steps).
#[test]
fn a_second_sync_with_the_same_config_does_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut s = Store::open(&path).unwrap();
    assert!(
        s.sync_lcs(&config(true).lcs).unwrap(),
        "the first sync writes"
    );
    drop(s);

    // Another connection holds the write lock; the store waits up to 10 s for it.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let t = std::time::Instant::now();
    let mut s = Store::open(&path).unwrap();
    assert!(!s.sync_lcs(&config(true).lcs).unwrap(), "nothing to write");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "the unchanged sync waited for the write lock: {:?}",
        t.elapsed()
    );
    assert_eq!(s.lcs().unwrap().len(), 2);
    holder.execute_batch("COMMIT").unwrap();

    // A changed config writes again, and then is remembered.
    assert!(s.sync_lcs(&config(false).lcs).unwrap());
    assert_eq!(s.lcs().unwrap().len(), 1);
    assert!(!s.sync_lcs(&config(false).lcs).unwrap());
}

#[test]
fn patch_table_flags_and_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(&dir.path().join("state.db")).unwrap();
    let p = NewPatch {
        id: "demo-1.0.1",
        title: "upgrade",
        category: Category::Security,
        severity: "high",
        published: "2026-11-25T00:00:00Z",
        sha256: "ab",
        file: "/x",
    };
    s.register_patch(&p).unwrap();
    assert!(matches!(s.register_patch(&p), Err(StoreError::Conflict(_))));
    s.mark_patch("demo-1.0.1", true).unwrap();
    assert!(s.patch("demo-1.0.1").unwrap().unwrap().apply_next);
    s.record_patch_result("demo-1.0.1", "lc2", PatchResult::Failed, "boom")
        .unwrap();
    let row = s.patch("demo-1.0.1").unwrap().unwrap();
    assert_eq!(row.last_result, Some(PatchResult::Failed));
    assert!(row.apply_next, "a failed patch stays marked");
    assert!(row.applied_ms.is_none());
    s.record_patch_result("demo-1.0.1", "lc2", PatchResult::Ok, "done")
        .unwrap();
    let row = s.patch("demo-1.0.1").unwrap().unwrap();
    assert!(!row.apply_next);
    assert_eq!(row.applied_lc.as_deref(), Some("lc2"));
    assert!(matches!(
        s.mark_patch("nope", true),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn one_open_run_per_lc_and_steps_are_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut s = Store::open(&path).unwrap();
    let run = s.begin_run("lc1", "path", false).unwrap();
    // A second handle, as a second patchover process would have.
    let mut other = Store::open(&path).unwrap();
    match other.begin_run("lc1", "seamless", false) {
        Err(StoreError::Conflict(m)) => assert!(m.contains(&format!("run {run}")), "{m}"),
        r => panic!("expected a conflict, got {r:?}"),
    }
    other.begin_run("lc9", "path", true).unwrap();
    s.record_step(run, "standby_search", "started", None)
        .unwrap();
    s.record_step(
        run,
        "standby_search",
        "done",
        Some(&serde_json::json!({"standby": "lc2"})),
    )
    .unwrap();
    let steps = other.steps(run).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[1].detail.as_ref().unwrap()["standby"], "lc2");
    assert_eq!(
        other.run(run).unwrap().unwrap().state,
        "standby_search:done"
    );
    s.end_run(run, "ok", &serde_json::json!({})).unwrap();
    assert!(s.open_run("lc1").unwrap().is_none());
    s.begin_run("lc1", "path", false).unwrap();
}

/// Regression: a run journaled by one process while another (the daemon answering a request)
/// syncs the resource table failed with "database is locked": a deferred transaction that
/// reads before it writes gets SQLITE_BUSY at once instead of waiting. Writers now take the
/// write lock up front and wait.
#[test]
fn r_concurrent_writers_wait_instead_of_database_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut s = Store::open(&path).unwrap();
    let run = s.begin_run("lc1", "path", false).unwrap();
    let p2 = path.clone();
    let syncer = std::thread::spawn(move || {
        let mut other = Store::open(&p2).unwrap();
        let lcs = config(true).lcs;
        for i in 0..2000 {
            let mut l = lcs.clone();
            l[0].memory_mib = 64 + i % 2;
            other.sync_lcs(&l).unwrap();
        }
    });
    for i in 0..2000 {
        s.record_step(run, &format!("step{i}"), "started", None)
            .unwrap();
    }
    syncer.join().unwrap();
    assert_eq!(s.steps(run).unwrap().len(), 2000);
}

/// The newest index accepted per feed (issue 22: rollback and freeze) is kept across a reopen,
/// which is what lets a restarted monitor still refuse an older index.
#[test]
fn feed_state_keeps_the_newest_index_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let row = FeedStateRow {
        feed: "vendor".into(),
        url: "https://example.org/feed/index.json".into(),
        etag: Some("\"e\"".into()),
        index_generated_s: Some(1_794_996_000),
        index_expires_s: Some(1_795_600_800),
        apt_set: Some("5e7".into()),
        apt_bundle: Some("apt-0123456789abcdef".into()),
        ..FeedStateRow::default()
    };
    Store::open(&path).unwrap().save_feed_state(&row).unwrap();
    let s = Store::open(&path).unwrap();
    assert_eq!(s.feed_state("vendor").unwrap(), Some(row));
}
