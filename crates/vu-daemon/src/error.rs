//! error: being written.
