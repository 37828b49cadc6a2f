//! Mount points as the runtime sees them: a namespace bound to a file is a mount point until it
//! is removed (statx's mount-root attribute, with /proc/self/mountinfo where the kernel lacks
//! it). Needs root (a network namespace is made and bound).

use skiff_runtime::monitor::{create_netns, is_mountpoint, remove_netns};

/// Removes the bound namespace even when an assertion fails.
struct Bound(std::path::PathBuf);

impl Drop for Bound {
    fn drop(&mut self) {
        remove_netns(&self.0);
    }
}

#[test]
fn a_bound_namespace_is_a_mount_point_until_removed() {
    if !skiff_testkit::require(&[skiff_testkit::Need::Root]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"").expect("plain file");
    assert!(!is_mountpoint(&plain), "a plain file is not a mount point");
    assert!(!is_mountpoint(&tmp.path().join("missing")));
    assert!(is_mountpoint(std::path::Path::new("/proc")));
    assert_eq!(
        skiff_runtime::sys::is_mount_root(std::path::Path::new("/")).expect("statx /"),
        Some(true),
        "this kernel (5.8 or later) reports the mount-root attribute"
    );

    let ns = Bound(tmp.path().join("netns"));
    create_netns(&ns.0).expect("network namespace");
    assert!(is_mountpoint(&ns.0), "the bound namespace is a mount point");
    // Made again: nothing changes (it is already bound).
    create_netns(&ns.0).expect("again");
    remove_netns(&ns.0);
    assert!(!is_mountpoint(&ns.0));
    assert!(!ns.0.exists(), "the file goes with it");
}
