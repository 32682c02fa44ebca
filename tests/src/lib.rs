//! Shared test support for the vu workspace.
