//! daemon: being written.
