//! TODO: features (being written).
