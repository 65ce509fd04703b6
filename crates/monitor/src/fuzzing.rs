//! Fuzz target bodies: the parsers of outside input, callable from cargo-fuzz targets
//! (`fuzz/fuzz_targets/feed_index.rs`, `reply.rs`) and from the stable smoke test
//! (`tests/fuzz_smoke.rs`). Each must never panic, whatever the bytes.

/// The feed index reader: a parsed index must serialise back and parse again the same.
/// Returns whether the input was accepted.
pub fn feed_index(data: &[u8]) -> bool {
    let parsed = crate::index::FeedIndex::parse(data);
    let ok = parsed.is_ok();
    if let Ok(idx) = parsed {
        let again = serde_json::to_vec(&idx).expect("a parsed index serialises");
        let back = crate::index::FeedIndex::parse(&again).expect("a serialised index parses");
        assert_eq!(back, idx);
        assert_eq!(
            idx.new_entries(&Default::default()).len(),
            idx.bundles.len()
        );
    }
    ok
}

/// The reply parser: whatever it returns must be self-consistent. Returns whether the input
/// was read as an answer.
pub fn reply(data: &[u8]) -> bool {
    let parsed = crate::reply::parse_reply(data);
    let ok = parsed.is_ok();
    if let Ok(r) = parsed {
        assert!(crate::approval::is_challenge(&r.challenge));
        assert!(crate::config::valid_address(&r.from));
        let canon = r.decision.canonical();
        let again: crate::approval::Decision = canon.parse().expect("canonical decision parses");
        assert_eq!(again, r.decision);
    }
    ok
}
