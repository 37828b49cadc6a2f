//! Which cgroup layout the host has (v1, hybrid, v2) and which hierarchies we use on it.
//!
//! Decided from `statfs("/sys/fs/cgroup")` and `/proc/self/mountinfo`, the same sources
//! cgroups-rs uses, and checked against `cgroups_rs::fs::hierarchies::auto()` so that the two
//! never disagree (cgroups-rs treats a hybrid host as v1 and ignores its cgroup2 mount; we add
//! that mount ourselves).

use std::path::{Path, PathBuf};

use super::CgroupError;

/// Where the cgroup filesystems are mounted; also the only cgroup2 root cgroups-rs knows.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    V1,
    Hybrid,
    V2,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::V1 => "v1",
            Mode::Hybrid => "hybrid",
            Mode::V2 => "v2",
        }
    }
}

/// The hierarchies the agent's cgroups live in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    pub(crate) mode: Mode,
    /// The cgroups-rs controller names to create cgroups with: on v1 one per hierarchy we join
    /// ("memory", "cpu", "pids", "cpuacct", "freezer", "name=systemd", maybe "cpuset"); on v2
    /// the controllers enabled down the parent path ("cpu", "memory", "pids").
    pub(crate) controllers: Vec<String>,
    /// The cgroup2 mount of a hybrid host (usually `/sys/fs/cgroup/unified`); on v2 the root.
    pub(crate) unified: Option<PathBuf>,
}

/// v1 controllers without which no limit can be set.
const V1_REQUIRED: [&str; 3] = ["memory", "cpu", "pids"];
/// v1 hierarchies joined when mounted: cpu usage, the freezer for `kill_all`, systemd's
/// tracking hierarchy (so `systemctl stop` of the agent does not take its containers along)
/// and the device list (without it, or cgroup2, `set_devices` refuses: see there).
const V1_OPTIONAL: [&str; 4] = ["cpuacct", "freezer", "name=systemd", "devices"];
/// v2 controllers enabled for our cgroups.
const V2_REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// One cgroup or cgroup2 mount from mountinfo.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mount {
    pub(crate) point: PathBuf,
    /// "cgroup" or "cgroup2".
    pub(crate) fstype: String,
    /// Super-block options: the v1 controllers ("cpu", "cpuacct", "name=systemd", ...).
    pub(crate) options: Vec<String>,
}

/// The cgroup and cgroup2 mounts in a mountinfo file, in order.
pub(crate) fn parse_mountinfo(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let options = right.nth(1).unwrap_or("");
            Some(Mount {
                point: PathBuf::from(point),
                fstype: fstype.to_string(),
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

impl Layout {
    /// Looks at this host; `rs_v2`: whether cgroups-rs takes it for a v2 host (checked to
    /// agree).
    pub(crate) fn detect(rs_v2: bool) -> Result<Layout, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        let root_is_v2 = match nix::sys::statfs::statfs(root) {
            Ok(st) => st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC,
            Err(e) => {
                return Err(CgroupError::NoCgroupFs(format!(
                    "statfs {CGROUP_ROOT}: {e}"
                )));
            }
        };
        let mountinfo_path = Path::new("/proc/self/mountinfo");
        let mounts = parse_mountinfo(&super::read_file(mountinfo_path)?);
        let v2_controllers = if root_is_v2 {
            Some(super::read_file(&root.join("cgroup.controllers"))?)
        } else {
            None
        };
        let layout = Layout::from_mounts(root_is_v2, &mounts, v2_controllers.as_deref())?;
        if rs_v2 != (layout.mode == Mode::V2) {
            return Err(CgroupError::NoCgroupFs(format!(
                "cgroups-rs sees a {} host, mountinfo a {} one",
                if rs_v2 { "v2" } else { "v1" },
                layout.mode.as_str()
            )));
        }
        Ok(layout)
    }

    /// The layout for a host whose `/sys/fs/cgroup` is (or not) cgroup2, with these mounts
    /// and, on v2, this `cgroup.controllers` content.
    pub(crate) fn from_mounts(
        root_is_v2: bool,
        mounts: &[Mount],
        v2_controllers: Option<&str>,
    ) -> Result<Layout, CgroupError> {
        if root_is_v2 {
            let available: Vec<&str> = v2_controllers.unwrap_or("").split_whitespace().collect();
            for c in V2_REQUIRED {
                if !available.contains(&c) {
                    return Err(CgroupError::MissingController {
                        controller: c,
                        detail: format!(
                            "{CGROUP_ROOT}/cgroup.controllers lists {:?}",
                            available.join(" ")
                        ),
                    });
                }
            }
            return Ok(Layout {
                mode: Mode::V2,
                controllers: V2_REQUIRED.iter().map(|c| c.to_string()).collect(),
                unified: Some(PathBuf::from(CGROUP_ROOT)),
            });
        }

        // As cgroups-rs does: the first v1 mount whose options name the controller.
        let v1_mount = |c: &str| {
            mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c))
        };
        if !mounts.iter().any(|m| m.fstype == "cgroup") {
            return Err(CgroupError::NoCgroupFs(format!(
                "{CGROUP_ROOT} is not cgroup2 and no cgroup v1 hierarchy is mounted"
            )));
        }
        let mut controllers = Vec::new();
        for c in V1_REQUIRED {
            if v1_mount(c).is_none() {
                return Err(CgroupError::MissingController {
                    controller: c,
                    detail: "no cgroup v1 hierarchy with it is mounted".to_string(),
                });
            }
            controllers.push(c.to_string());
        }
        for c in V1_OPTIONAL {
            if v1_mount(c).is_some() {
                controllers.push(c.to_string());
            }
        }
        // A cpuset co-mounted with a hierarchy we join: the new cgroup is a cpuset cgroup too,
        // and takes no task until its cpus and mems are set; cgroups-rs copies them from the
        // parent when cpuset is one of the controllers.
        let comounted_cpuset = controllers
            .iter()
            .filter_map(|c| v1_mount(c))
            .any(|m| m.options.iter().any(|o| o == "cpuset"));
        if comounted_cpuset {
            controllers.push("cpuset".to_string());
        }
        let unified = mounts
            .iter()
            .filter(|m| m.fstype == "cgroup2")
            .map(|m| m.point.clone())
            .min_by_key(|p| p != Path::new("/sys/fs/cgroup/unified"));
        Ok(Layout {
            mode: if unified.is_some() {
                Mode::Hybrid
            } else {
                Mode::V1
            },
            controllers,
            unified,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_SPLIT: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const V1_COMOUNTED: &str = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
29 25 0:26 / /sys/fs/cgroup/cpuset,cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpuset,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:12 - cgroup cgroup rw,pids
";

    #[test]
    fn mountinfo_keeps_cgroup_mounts_only() {
        let mounts = parse_mountinfo(HYBRID_SPLIT);
        assert_eq!(mounts.len(), 9);
        assert_eq!(mounts[0].point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(mounts[0].options, ["rw", "cpu"]);
        assert_eq!(mounts[8].fstype, "cgroup2");
        let comounted = parse_mountinfo(V1_COMOUNTED);
        assert_eq!(comounted[0].options, ["rw", "cpuset", "cpu", "cpuacct"]);
    }

    #[test]
    fn hybrid_host_joins_v1_hierarchies_and_unified() {
        let layout =
            Layout::from_mounts(false, &parse_mountinfo(HYBRID_SPLIT), None).expect("layout");
        assert_eq!(layout.mode, Mode::Hybrid);
        assert_eq!(
            layout.controllers,
            [
                "memory",
                "cpu",
                "pids",
                "cpuacct",
                "freezer",
                "name=systemd",
                "devices"
            ]
        );
        assert_eq!(
            layout.unified,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cpuset_comounted_with_cpu_is_initialised() {
        let layout =
            Layout::from_mounts(false, &parse_mountinfo(V1_COMOUNTED), None).expect("layout");
        assert_eq!(layout.mode, Mode::V1);
        assert_eq!(
            layout.controllers,
            ["memory", "cpu", "pids", "cpuacct", "cpuset"]
        );
        assert_eq!(layout.unified, None);
    }

    #[test]
    fn missing_v1_controller_is_named() {
        let mounts: Vec<Mount> = parse_mountinfo(HYBRID_SPLIT)
            .into_iter()
            .filter(|m| !m.options.contains(&"pids".to_string()))
            .collect();
        let err = Layout::from_mounts(false, &mounts, None).expect_err("no pids");
        assert_eq!(
            err.to_string(),
            "the pids cgroup controller is not available: no cgroup v1 hierarchy with it is mounted"
        );
        let err = Layout::from_mounts(false, &[], None).expect_err("nothing mounted");
        assert!(
            err.to_string().starts_with("no usable cgroup filesystem"),
            "{err}"
        );
    }

    #[test]
    fn v2_needs_cpu_memory_pids() {
        let layout =
            Layout::from_mounts(true, &[], Some("cpuset cpu io memory hugetlb pids rdma\n"))
                .expect("layout");
        assert_eq!(layout.mode, Mode::V2);
        assert_eq!(layout.controllers, ["cpu", "memory", "pids"]);
        let err = Layout::from_mounts(true, &[], Some("cpu io memory\n")).expect_err("no pids");
        assert!(
            err.to_string().contains("the pids cgroup controller"),
            "{err}"
        );
    }
}
