//! TODO: message (being written).
