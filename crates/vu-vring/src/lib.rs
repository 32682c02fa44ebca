//! vu-vring: being written; see the crate description.
