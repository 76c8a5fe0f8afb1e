//! The OCI images and archives the agent's artifact tests build (a busybox rootfs in two
//! layers, with a whiteout and an opaque directory), shared with the end-to-end tests and the
//! scenarios the v2 VM runs.

#[allow(missing_debug_implementations)]
#[path = "../../agent/tests/artifacts/build.rs"]
pub mod build;
#[allow(missing_debug_implementations)]
#[path = "../../agent/tests/artifacts/image.rs"]
pub mod image;
