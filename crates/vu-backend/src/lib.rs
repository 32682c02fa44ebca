//! vu-backend: being written; see the crate description.

#[cfg(all(feature = "xen", feature = "postcopy"))]
compile_error!("the `xen` and `postcopy` features are mutually exclusive: Xen mappings cannot be registered with userfaultfd");
