//! from-apt's reader of a running Debian LC's answers (status, os-release, md5sum, df).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    patchover_debian::fuzzing::agent_reader(data);
});
