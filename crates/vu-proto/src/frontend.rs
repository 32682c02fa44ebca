//! TODO: frontend (being written).
