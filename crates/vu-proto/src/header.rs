//! TODO: header (being written).
