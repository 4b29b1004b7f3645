//! `state.json` loading. Property: a state it accepts is written back and read to the same state.
#![no_main]

use enroll_agent::state::State;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = State::from_json(data) else {
        return;
    };
    let written = state.to_json();
    assert_eq!(State::from_json(written.as_bytes()), Ok(state), "{written}");
});
