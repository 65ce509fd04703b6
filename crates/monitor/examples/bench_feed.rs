//! `cargo run --release -p patchover-monitor --example bench_feed [ENTRIES [KNOWN]]`: the
//! feed index benchmark without building the whole CLI (same code as `patchover bench feed`).

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let entries = args.next().and_then(Result::ok).unwrap_or(10_000);
    let known = args.next().and_then(Result::ok).unwrap_or(entries / 2);
    match patchover_monitor::bench::feed_index(entries, known, 7) {
        Ok(b) => println!(
            "feed index: {} entries ({} KiB), {} known, {} new: verify + parse + diff {:.1} ms (goal < {} ms: {}); bare JSON parse baseline {:.1} ms",
            b.entries,
            b.index_bytes / 1024,
            b.known,
            b.new,
            b.verify_parse_diff_ms,
            b.goal_ms,
            if b.met { "met" } else { "MISSED" },
            b.baseline_bare_json_ms
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
