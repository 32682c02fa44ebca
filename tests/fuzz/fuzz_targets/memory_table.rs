//! Fuzz target `memory_table`: the body is `vu_daemon::fuzzing::memory_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vu_daemon::fuzzing::memory_table(data));
