//! The host's side of the agent channel on whatever an LC's agent says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    patchover_agent::fuzzing::agent_channel(data);
});
