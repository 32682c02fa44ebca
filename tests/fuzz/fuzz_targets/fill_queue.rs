//! Fuzz target `fill_queue`: the body is `vu_tests::fill_hostile::fill_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vu_tests::fill_hostile::fill_queue(data);
});
