//! The monitor's approval reply parser on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    patchover_monitor::fuzzing::reply(data);
});
