//! Fuzz target `iotlb`: the body is `vu_daemon::fuzzing::iotlb`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vu_daemon::fuzzing::iotlb(data);
});
