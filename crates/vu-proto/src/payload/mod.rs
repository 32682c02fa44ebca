//! TODO: payloads (being written).
