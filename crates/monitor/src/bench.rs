//! The feed index benchmark of issue 7: a 10,000-entry index verified, parsed, validated and
//! compared with the patch table in < 100 ms, against a baseline measured in the same run (a
//! bare JSON parse of the same bytes: no signature, no validation, no table). Run by
//! `patchover bench feed` and `cargo run --release -p patchover-monitor --example bench_feed`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_bundle::{TrustedKey, TrustedKeys};
use patchover_core::Category;
use patchover_store::{NewPatch, Store};
use serde::Serialize;

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot set up the benchmark in {path}")]
    Setup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("benchmark key")]
    Key(#[source] patchover_bundle::KeyError),
    #[error("benchmark store")]
    Store(#[source] patchover_store::StoreError),
    #[error("benchmark index")]
    Poll(#[source] crate::poll::PollError),
}

/// What the benchmark measured (medians).
#[derive(Debug, Clone, Serialize)]
pub struct FeedBench {
    pub entries: usize,
    pub known: usize,
    pub new: usize,
    pub index_bytes: usize,
    pub verify_parse_diff_ms: f64,
    pub baseline_bare_json_ms: f64,
    pub goal_ms: f64,
    pub met: bool,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Builds a signed index of `entries` bundles, `known` of which are in a fresh patch table,
/// and times `runs` rounds of [`crate::poll::diff_index`] against the bare-parse baseline.
pub fn feed_index(entries: usize, known: usize, runs: usize) -> Result<FeedBench, BenchError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = TempDir(std::env::temp_dir().join(format!(
        "patchover-bench-feed-{}-{nanos}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).map_err(|source| BenchError::Setup {
        path: dir.0.clone(),
        source,
    })?;
    let (public, secret) = (dir.0.join("k.pub"), dir.0.join("k.key"));
    generate_keypair(&public, &secret, None).map_err(BenchError::Key)?;
    let key = SigningKey::from_file(&secret, None).map_err(BenchError::Key)?;
    let keys = TrustedKeys::new(vec![
        TrustedKey::from_file(&public).map_err(BenchError::Key)?,
    ])
    .map_err(BenchError::Key)?;
    let mut store = Store::open(&dir.0.join("state.db")).map_err(BenchError::Store)?;
    let sha = "ab".repeat(32);
    for i in 0..known.min(entries) {
        let id = format!("patch-{i:06}");
        store
            .register_patch(&NewPatch {
                id: &id,
                title: "benchmark patch",
                category: Category::Security,
                severity: "high",
                published: "2026-11-20T10:00:00Z",
                sha256: &sha,
                file: "/nonexistent",
            })
            .map_err(BenchError::Store)?;
    }
    let list: Vec<serde_json::Value> = (0..entries)
        .map(|i| {
            let category = ["security", "bugfix", "enhancement"][i % 3];
            serde_json::json!({
                "id": format!("patch-{i:06}"),
                "title": format!("benchmark patch number {i}"),
                "category": category,
                "severity": "high",
                "published": "2026-11-20T10:00:00Z",
                "url": format!("bundles/patch-{i:06}.tar.zst"),
                "size": 4096 + i,
                "sha256": sha,
            })
        })
        .collect();
    let bytes = serde_json::to_vec(&serde_json::json!({
        "format": 1, "generated": "2026-11-20T10:00:00Z", "bundles": list
    }))
    .unwrap_or_default();
    let sig = key
        .sign(&bytes, "file:index.json")
        .map_err(BenchError::Key)?;
    let (mut ours, mut base, mut new) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let (_, fresh) =
            crate::poll::diff_index(&bytes, &sig, &keys, &store).map_err(BenchError::Poll)?;
        ours.push(t.elapsed());
        new = fresh;
        let t = Instant::now();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let ids: HashSet<&str> = v["bundles"]
            .as_array()
            .map(|b| b.iter().filter_map(|e| e["id"].as_str()).collect())
            .unwrap_or_default();
        std::hint::black_box(ids);
        base.push(t.elapsed());
    }
    let (ours, base) = (median(ours), median(base));
    Ok(FeedBench {
        entries,
        known: known.min(entries),
        new,
        index_bytes: bytes.len(),
        verify_parse_diff_ms: ours.as_secs_f64() * 1e3,
        baseline_bare_json_ms: base.as_secs_f64() * 1e3,
        goal_ms: 100.0,
        met: ours < Duration::from_millis(100),
    })
}
