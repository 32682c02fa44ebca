//! TODO: listener (being written).
