//! The bundle archive reader (zstd + tar + manifest) on arbitrary bytes.
//!
//! Most byte mutations of a zstd stream only break its checksum, and most of a tar's only
//! break a header's checksum, so half the mutations are made to the tar inside: unpacked
//! (bounded), mutated by libFuzzer, its header checksums made right again, packed. The other
//! half mutate the bytes as they are, for the zstd decoder's sake.
#![no_main]

use std::io::Read;

use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(|data: &[u8]| {
    patchover_bundle::fuzzing::archive(data);
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let Some(mut tar) = (seed % 2 == 0).then(|| unpack(&data[..size])).flatten() else {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    };
    let len = tar.len();
    tar.resize(len.max(max_size), 0);
    let cap = tar.len();
    let n = libfuzzer_sys::fuzzer_mutate(&mut tar, len, cap);
    tar.truncate(n);
    fix_checksums(&mut tar);
    let packed = zstd::encode_all(&tar[..], 1).expect("zstd into a vec");
    if packed.len() > max_size {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    data[..packed.len()].copy_from_slice(&packed);
    packed.len()
});

/// The tar inside, when `data` is a zstd stream that unpacks to at most 1 MiB.
fn unpack(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(data)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// Sets the checksum of every header the tar's size fields lead to.
fn fix_checksums(tar: &mut [u8]) {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let h = &mut tar[at..at + 512];
        if h.iter().all(|b| *b == 0) {
            return;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = std::str::from_utf8(&h[124..136])
            .ok()
            .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
            .and_then(|s| u64::from_str_radix(s, 8).ok())
            .unwrap_or(0);
        at += 512 + (size.div_ceil(512) * 512) as usize;
    }
}
