//! TODO: wire (being written).
