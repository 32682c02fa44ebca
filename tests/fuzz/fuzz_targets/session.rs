//! Fuzz target `session`: the body is `vu_daemon::fuzzing::session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vu_daemon::fuzzing::session(data);
});
