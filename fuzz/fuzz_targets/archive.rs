//! The bundle archive reader (zstd + tar + manifest) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    patchover_bundle::fuzzing::archive(data);
});
