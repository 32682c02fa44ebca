//! vu-mem: being written; see the crate description.
