//! TODO: socket (being written).
