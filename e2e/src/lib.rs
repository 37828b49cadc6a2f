//! Helpers for end-to-end tests that run the real `skiff-controller` and `skiff` binaries.
