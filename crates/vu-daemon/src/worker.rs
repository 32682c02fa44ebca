//! worker: being written.
