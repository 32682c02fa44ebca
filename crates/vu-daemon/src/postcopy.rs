//! postcopy: being written.
