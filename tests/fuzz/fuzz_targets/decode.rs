//! Fuzz target `decode`: the body is `vu_proto::fuzzing::decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vu_proto::fuzzing::decode(data));
