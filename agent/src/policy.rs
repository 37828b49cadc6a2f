//! What this node lets a task use of the host, decided here before anything starts: local
//! image sources only from the directories the agent allows (`--local-image-dir`), host
//! devices only those it allows (`--allow-device`). A task that asks for more is refused with
//! the reason, reported as its allocation's failure. (`skiff-agent container run` by hand, as
//! root on the host, is not subject to this.)

use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use skiff_runtime::devices::{DeviceKind, DeviceNode};

use crate::contract::ContainerTask;

/// The node's policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Directories local image sources may come from (canonical paths).
    pub local_image_dirs: Vec<PathBuf>,
    /// Host devices tasks may be granted.
    pub allowed_devices: Vec<PathBuf>,
    /// Directories under which host volumes may be mounted (canonical paths).
    pub host_volume_dirs: Vec<PathBuf>,
}

impl Policy {
    /// Checks one container of a task against the policy; returns the device nodes to grant.
    pub fn admit(&self, container: &ContainerTask) -> Result<Vec<DeviceNode>, String> {
        self.image(&container.image)?;
        container
            .devices
            .iter()
            .map(|(path, access)| self.device(path, *access))
            .collect()
    }

    /// A host volume's directory must exist and resolve (symlinks and `..` followed) to a
    /// path under an allowed directory; returns the resolved path, the one mounted.
    pub fn host_volume(&self, name: &str, path: &str) -> Result<PathBuf, String> {
        let refused = |why: String| {
            format!(
                "host volume {name}: {why}; host volumes come only from the directories this \
                 agent allows (--host-volume-dir {})",
                if self.host_volume_dirs.is_empty() {
                    "is not set".to_owned()
                } else {
                    self.host_volume_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )
        };
        let real = std::fs::canonicalize(path).map_err(|e| refused(format!("{path}: {e}")))?;
        if !real.is_dir() {
            return Err(refused(format!("{path} is not a directory")));
        }
        if self
            .host_volume_dirs
            .iter()
            .any(|d| real.starts_with(d) && real != *d)
        {
            Ok(real)
        } else {
            Err(refused(format!("{} is not allowed", real.display())))
        }
    }

    /// A local image source must resolve (symlinks followed) to a path under an allowed
    /// directory; registry references are always fine.
    pub fn image(&self, image: &str) -> Result<(), String> {
        let path = match skiff_runtime::image::local_source_path(image) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let refused = |why: String| {
            format!(
                "image {image}: {why}; local images come only from the directories this \
                 agent allows (--local-image-dir {})",
                if self.local_image_dirs.is_empty() {
                    "is not set".to_owned()
                } else {
                    self.local_image_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )
        };
        let real = std::fs::canonicalize(&path)
            .map_err(|e| refused(format!("{}: {e}", path.display())))?;
        if self.local_image_dirs.iter().any(|d| real.starts_with(d)) {
            Ok(())
        } else {
            Err(refused(format!("{} is not allowed", real.display())))
        }
    }

    /// A device the agent allows, as it is on the host.
    fn device(&self, path: &str, access: u32) -> Result<DeviceNode, String> {
        if !self.allowed_devices.iter().any(|d| d == Path::new(path)) {
            return Err(format!(
                "device {path} is not allowed on this node (the agent grants only --allow-device)"
            ));
        }
        host_device(path, access)
    }
}

/// The host's device node at `path`, to be made at the same path in a container with
/// `access` (an `ACC_*` mask).
pub fn host_device(path: &str, access: u32) -> Result<DeviceNode, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("device {path}: {e}"))?;
    let kind = if meta.file_type().is_char_device() {
        DeviceKind::Char
    } else if meta.file_type().is_block_device() {
        DeviceKind::Block
    } else {
        return Err(format!("{path} is not a device on this node"));
    };
    let rdev = meta.rdev();
    Ok(DeviceNode {
        path: path.to_owned(),
        kind,
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
        access,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(image: &str, devices: &[(&str, u32)]) -> ContainerTask {
        let mut c = ContainerTask::new("main", image);
        c.devices = devices.iter().map(|(p, a)| (p.to_string(), *a)).collect();
        c
    }

    #[test]
    fn local_images_only_from_allowed_directories() {
        let allowed = tempfile::tempdir().expect("tmp");
        let other = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(allowed.path().join("web")).expect("dir");
        std::fs::create_dir(other.path().join("secret")).expect("dir");
        // A symlink inside the allowed dir pointing out of it is refused too.
        std::os::unix::fs::symlink(other.path().join("secret"), allowed.path().join("escape"))
            .expect("symlink");
        let policy = Policy {
            local_image_dirs: vec![std::fs::canonicalize(allowed.path()).expect("real")],
            ..Policy::default()
        };
        let ok = format!("oci:{}/web:1", allowed.path().display());
        assert!(policy.admit(&task(&ok, &[])).is_ok());
        assert!(policy.admit(&task("127.0.0.1:5000/web:1", &[])).is_ok());
        for bad in [
            format!("oci:{}/secret", other.path().display()),
            format!("oci:{}/escape", allowed.path().display()),
            format!("oci-archive:{}/x.tar", other.path().display()),
            "docker-archive:/etc/shadow".to_owned(),
        ] {
            let e = policy.admit(&task(&bad, &[])).expect_err(&bad);
            assert!(e.contains("--local-image-dir"), "{e}");
        }
        let none = Policy::default();
        let e = none.admit(&task(&ok, &[])).expect_err("no dir allowed");
        assert!(e.contains("--local-image-dir is not set"), "{e}");
    }

    #[test]
    fn devices_only_those_allowed_and_as_they_are_on_the_host() {
        let policy = Policy {
            allowed_devices: vec![PathBuf::from("/dev/null")],
            ..Policy::default()
        };
        let nodes = policy
            .admit(&task("reg/x:1", &[("/dev/null", 6)]))
            .expect("allowed");
        assert_eq!(
            nodes,
            [DeviceNode {
                path: "/dev/null".into(),
                kind: DeviceKind::Char,
                major: 1,
                minor: 3,
                access: 6,
            }]
        );
        let e = policy
            .admit(&task("reg/x:1", &[("/dev/loop0", 6)]))
            .expect_err("not allowed");
        assert!(e.contains("device /dev/loop0 is not allowed"), "{e}");
    }

    #[test]
    fn host_volumes_only_under_allowed_directories_after_resolving() {
        let allowed = tempfile::tempdir().expect("tmp");
        let other = tempfile::tempdir().expect("tmp");
        let root = std::fs::canonicalize(allowed.path()).expect("real");
        std::fs::create_dir(root.join("data")).expect("dir");
        std::os::unix::fs::symlink(other.path(), root.join("escape")).expect("symlink");
        let policy = Policy {
            host_volume_dirs: vec![root.clone()],
            ..Policy::default()
        };
        let data = format!("{}/data", root.display());
        assert_eq!(
            policy.host_volume("v", &data).expect("allowed"),
            root.join("data")
        );
        for bad in [
            format!("{}/escape", root.display()),
            format!("{}/data/../..", root.display()),
            format!("{}", root.display()),
            format!("{}/missing", root.display()),
            "/etc".to_owned(),
        ] {
            let e = policy.host_volume("v", &bad).expect_err(&bad);
            assert!(e.contains("--host-volume-dir"), "{e}");
        }
    }
}
