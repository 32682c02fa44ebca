//! The packed virtqueue driver of the tests: the facade's test kit
//! ([`vu_backend::testing::PackedQueue`]), as [`virtqueue`](crate::virtqueue) is for split rings.

pub use vu_backend::testing::{
    avail_bits, PackedQueue, Pos, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE, PACKED_AVAIL,
    PACKED_INDIRECT, PACKED_NEXT, PACKED_USED, PACKED_WRITE,
};
