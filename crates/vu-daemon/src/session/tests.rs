//! Session tests (being written).
