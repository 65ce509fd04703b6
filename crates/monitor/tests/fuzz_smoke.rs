//! Runs the fuzz target bodies (`patchover_monitor::fuzzing`, the same functions the
//! cargo-fuzz targets `fuzz/fuzz_targets/feed_index.rs` and `reply.rs` call) over seed inputs
//! and random mutations for a few seconds, so CI exercises the feed index reader and the
//! reply parser on stable Rust. Time per target: `PATCHOVER_FUZZ_SECS` (default 3). A failure
//! prints the input as hex to reproduce it.

use std::time::{Duration, Instant};

use patchover_monitor::fuzzing;

/// xorshift64*: tiny and deterministic; the seed is printed so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"\\u0000",
    b"{",
    b"}",
    b"[",
    b",",
    b"\r\n",
    b"\r\n\r\n",
    b"> ",
    b"=?utf-8?B?",
    b"--b\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Decision: approve all\r\n",
    b"Code: ",
    b"\xff\xfe",
    b"99999999999999999999",
    b"../",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(i..i, tok.iter().copied());
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below((v.len() - i).min(64) + 1);
                v.drain(i..i + n);
            }
            3 => v.truncate(rng.below(v.len() + 1)),
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a + 1);
                    let i = rng.below(v.len() + 1);
                    v.splice(i..i, other[a..b].iter().copied());
                }
            }
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

fn hex(d: &[u8]) -> String {
    use ct_codecs::Encoder;
    ct_codecs::Hex::encode_to_string(d).unwrap()
}

fn run(name: &str, seeds: Vec<Vec<u8>>, body: fn(&[u8]) -> bool) -> (u64, u64) {
    let secs: u64 = std::env::var("PATCHOVER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("{name}: rng seed {seed}, {secs} s");
    let mut rng = Rng(seed);
    let mut corpus = seeds.clone();
    let (mut runs, mut accepted) = (0u64, 0u64);
    let check = |data: &[u8]| -> bool {
        match std::panic::catch_unwind(|| body(data)) {
            Ok(ok) => ok,
            Err(_) => panic!("{name}: fuzz body panicked on input (hex) {}", hex(data)),
        }
    };
    for s in &seeds {
        runs += 1;
        accepted += u64::from(check(s));
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let base = corpus[rng.below(corpus.len())].clone();
        let input = mutate(&mut rng, &seeds, &base);
        runs += 1;
        if check(&input) {
            accepted += 1;
            if corpus.len() < 512 {
                corpus.push(input);
            }
        }
    }
    eprintln!("{name}: {runs} inputs, {accepted} accepted");
    (runs, accepted)
}

const ENTRY: &str = r#"{"id":"sec-1","title":"fix","category":"security","severity":"high","published":"2026-11-20T10:00:00Z","url":"sec-1.tar.zst","size":123,"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}"#;

#[test]
fn fuzz_feed_index_reader() {
    let two = format!(
        r#"{{"format":1,"generated":"2026-11-20T10:00:00Z","bundles":[{ENTRY},{}]}}"#,
        ENTRY
            .replace("sec-1", "fix-2")
            .replace("security", "bugfix")
    );
    let seeds = vec![
        two.into_bytes(),
        br#"{"format":1,"generated":"x","bundles":[]}"#.to_vec(),
        Vec::new(),
    ];
    let (runs, accepted) = run("feed_index", seeds, fuzzing::feed_index);
    assert!(accepted >= 2, "the valid seeds must be accepted");
    assert!(runs > accepted, "mutations must also reach the error paths");
}

#[test]
fn fuzz_reply_parser() {
    let ch = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let plain = format!(
        "From: Admin <admin@example.org>\r\nSubject: Re: x\r\nIn-Reply-To: <patchover.{ch}@example.org>\r\n\
Content-Type: text/plain; charset=utf-8\r\n\r\nDecision: approve sec-1 fix-2\r\nCode: AAAA-BBBB-CCCC-DDDD-EEEE-FFFF\r\n\
\r\nOn Fri, patchover wrote:\r\n> Challenge: {ch}\r\n"
    );
    let multipart = format!(
        "From: admin@example.org\r\nSubject: Re: x\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\nDecision: reject all\r\nCode: x=\r\ny\r\nChallenge: {ch}\r\n\
--b\r\nContent-Type: text/html\r\n\r\n<p>Decision: approve all</p>\r\n--b--\r\n"
    );
    let seeds = vec![plain.into_bytes(), multipart.into_bytes(), Vec::new()];
    let (runs, accepted) = run("reply", seeds, fuzzing::reply);
    assert!(accepted >= 2, "the valid seeds must be accepted");
    assert!(runs > accepted, "mutations must also reach the error paths");
}
