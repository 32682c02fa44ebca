//! Fuzz target `packed_queue`: the body is `vu_tests::packed_hostile::packed_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vu_tests::packed_hostile::packed_queue(data);
});
