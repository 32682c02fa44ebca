//! backend: being written.
