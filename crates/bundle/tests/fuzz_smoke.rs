//! Runs the fuzz target bodies (`patchover_bundle::fuzzing`, the same functions the cargo-fuzz
//! targets in `fuzz/` call) over seed inputs and random mutations of them for a few seconds,
//! so CI exercises the manifest and archive readers on stable Rust. The time per target is
//! `PATCHOVER_FUZZ_SECS` (default 3). A failure prints the input as hex to reproduce it.

use std::time::{Duration, Instant};

use patchover_bundle::fuzzing;

/// xorshift64*: a tiny deterministic generator; the seed is printed so a run can be repeated.
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
    b"..",
    b"/",
    b"\0",
    b"kind = \"rpm\"",
    b"[[step]]",
    b"[[check]]",
    b"\xff\xfe",
    b"\"",
    b"payload/../",
    b"9999999999999999999999",
    b"category = \"x\"",
    b"\n",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(i..i, tok.iter().copied());
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below((v.len() - i).min(64) + 1);
                v.drain(i..i + n);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 => {
                // Splice in a piece of another seed.
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
    let deadline = Instant::now() + Duration::from_secs(secs);
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
    while Instant::now() < deadline {
        let base = corpus[rng.below(corpus.len())].clone();
        let input = mutate(&mut rng, &seeds, &base);
        runs += 1;
        if check(&input) {
            accepted += 1;
            // Keep accepted variants: they reach deeper on the next mutation.
            if corpus.len() < 512 {
                corpus.push(input);
            }
        }
    }
    eprintln!("{name}: {runs} inputs, {accepted} accepted");
    (runs, accepted)
}

fn hex(d: &[u8]) -> String {
    use ct_codecs::Encoder;
    ct_codecs::Hex::encode_to_string(d).unwrap()
}

const MANIFEST: &str = r#"format = 1
id = "seed-1"
title = "seed"
category = "security"
severity = "high"
published = 2026-11-20T10:00:00Z
[targets]
lcs = ["lc1"]
[[step]]
kind = "script"
file = "run.sh"
args = ["a"]
[[step]]
kind = "patch"
file = "x.diff"
dir = "/srv"
[[step]]
kind = "replace"
path = "/etc/x"
file = "x"
old_sha256 = "absent"
[[check]]
kind = "file_hash"
path = "/etc/x"
sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
[[check]]
kind = "command_output"
command = ["/bin/true"]
contains = ""
"#;

#[test]
fn fuzz_manifest_parser() {
    let seeds = vec![
        MANIFEST.as_bytes().to_vec(),
        MANIFEST.replace("security", "bugfix").into_bytes(),
        b"format = 1\n".to_vec(),
        Vec::new(),
    ];
    let (runs, accepted) = run("manifest", seeds, fuzzing::manifest);
    assert!(accepted >= 2, "the valid seeds must be accepted");
    assert!(runs > accepted, "mutations must also reach the error paths");
}

#[test]
fn fuzz_archive_reader() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("payload");
    std::fs::create_dir_all(p.join("sub")).unwrap();
    for f in ["run.sh", "x.diff", "x"] {
        std::fs::write(p.join(f), format!("content of {f}\n")).unwrap();
    }
    std::os::unix::fs::symlink("../run.sh", p.join("sub/link")).unwrap();
    let mut good = Vec::new();
    patchover_bundle::archive::write_archive(MANIFEST.as_bytes(), Some(&p), &mut good).unwrap();
    // Also an uncompressed variant wrapped at a low level, so mutations hit the tar parser
    // rather than only zstd's checksum.
    let mut tar_only = Vec::new();
    {
        let mut dec = zstd::stream::read::Decoder::new(&good[..]).unwrap();
        std::io::Read::read_to_end(&mut dec, &mut tar_only).unwrap();
    }
    let seeds = vec![
        good,
        zstd::encode_all(&tar_only[..], 1).unwrap(),
        zstd::encode_all(&b""[..], 1).unwrap(),
    ];
    // Mutating the tar before compressing reaches the tar checks; mutating the compressed
    // bytes reaches zstd's. Do both.
    let (runs, accepted) = run("archive", seeds, fuzzing::archive);
    assert!(accepted >= 2, "the valid seeds must be accepted");
    assert!(runs > accepted);
    let tar_seeds = vec![tar_only];
    let (runs2, _) = run("archive-tar", tar_seeds, |d| {
        fuzzing::archive(&zstd::encode_all(d, 1).unwrap())
    });
    assert!(runs2 > 1);
}
