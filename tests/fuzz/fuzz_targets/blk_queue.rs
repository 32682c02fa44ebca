//! Fuzz target `blk_queue`: the body is `vu_tests::hostile::blk_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vu_tests::hostile::blk_queue(data));
