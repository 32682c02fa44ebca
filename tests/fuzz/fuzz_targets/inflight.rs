//! Fuzz target `inflight`: the body is `vu_vring::fuzzing::inflight_region`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vu_vring::fuzzing::inflight_region(data));
