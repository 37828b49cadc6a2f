//! Pods: what the containers of one allocation share. A pod is a directory under
//! `DATA_DIR/pods/<id>/` holding its network namespace (`net`, bound there and plumbed by the
//! runtime's network hook in bridge mode), its IPC namespace (`ipc`), and its ephemeral and
//! tmpfs volumes (`volumes/<name>`); `pod.json` records how it was made, so it can be taken
//! apart after a restart. Each container of the pod joins its namespaces and bind-mounts its
//! volumes (see [`crate::container::RunOptions`]); the pod outlives them until removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::{Runtime, RuntimeError};
use crate::monitor;
use crate::store::NetworkAttach;

/// A pod's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodNetwork {
    /// A namespace of its own with an address (plumbed by the network hook).
    #[default]
    Bridge,
    /// The host's namespace.
    Host,
    /// A namespace of its own with loopback only.
    None,
}

/// What backs one of a pod's volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodVolume {
    /// A directory in the pod, removed with it.
    Ephemeral,
    /// A tmpfs of this many bytes, mounted in the pod, gone with it.
    Tmpfs { size: u64 },
    /// A directory that outlives the pod (a named or host volume), resolved by the caller.
    Dir(PathBuf),
}

/// How a pod was made, kept in its `pod.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PodRecord {
    network: PodNetwork,
    volumes: BTreeMap<String, PodVolume>,
}

/// A pod's paths, for its containers to join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub id: String,
    pub dir: PathBuf,
    pub network: PodNetwork,
    /// The IPC namespace its containers share.
    pub ipc: PathBuf,
    /// Each volume's directory on the host.
    pub volumes: BTreeMap<String, PathBuf>,
}

impl Pod {
    /// The network namespace its containers join.
    pub fn network_attach(&self) -> NetworkAttach {
        match self.network {
            PodNetwork::Host => NetworkAttach::Host,
            PodNetwork::Bridge | PodNetwork::None => NetworkAttach::Join(self.dir.join("net")),
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::Invalid {
        field: "pod",
        reason: format!("{what} {}: {e}", path.display()),
    }
}

impl Runtime {
    fn pods_dir(&self) -> PathBuf {
        self.data_dir().join("pods")
    }

    /// Makes pod `id` (or returns it, when it exists and was made the same way, as after an
    /// agent restart). On failure nothing of it is left.
    pub fn create_pod(
        &self,
        id: &str,
        network: PodNetwork,
        volumes: &BTreeMap<String, PodVolume>,
    ) -> Result<Pod, RuntimeError> {
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(RuntimeError::Invalid {
                field: "pod",
                reason: format!("{id:?} is not a pod id (letters, digits and '-')"),
            });
        }
        let record = PodRecord {
            network,
            volumes: volumes.clone(),
        };
        let dir = self.pods_dir().join(id);
        if let Ok(text) = std::fs::read(dir.join("pod.json"))
            && let Ok(existing) = serde_json::from_slice::<PodRecord>(&text)
        {
            if existing == record {
                return Ok(self.pod_paths(id, &existing));
            }
            return Err(RuntimeError::Invalid {
                field: "pod",
                reason: format!("pod {id} exists, made differently; remove it first"),
            });
        }
        let made = self.make_pod(id, &dir, &record);
        if made.is_err() {
            self.remove_pod(id);
        }
        made
    }

    fn make_pod(&self, id: &str, dir: &Path, record: &PodRecord) -> Result<Pod, RuntimeError> {
        std::fs::create_dir_all(dir.join("volumes")).map_err(|e| io_err("creating", dir, e))?;
        let start = |reason: String| RuntimeError::Start {
            id: id.to_owned(),
            reason,
        };
        match record.network {
            PodNetwork::Host => {}
            PodNetwork::Bridge | PodNetwork::None => {
                let netns = dir.join("net");
                monitor::create_netns(&netns).map_err(start)?;
                if record.network == PodNetwork::Bridge
                    && let Some(hook) = self.network_hook()
                {
                    hook.attach(id, &netns)
                        .map_err(|e| start(format!("network: {e}")))?;
                }
            }
        }
        monitor::create_ipcns(&dir.join("ipc")).map_err(start)?;
        for (name, v) in &record.volumes {
            let path = dir.join("volumes").join(name);
            match v {
                PodVolume::Ephemeral => {
                    std::fs::create_dir_all(&path).map_err(|e| io_err("creating", &path, e))?;
                }
                PodVolume::Tmpfs { size } => {
                    std::fs::create_dir_all(&path).map_err(|e| io_err("creating", &path, e))?;
                    let opts = format!("size={size},mode=1777");
                    nix::mount::mount(
                        Some("tmpfs"),
                        &path,
                        Some("tmpfs"),
                        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                        Some(opts.as_str()),
                    )
                    .map_err(|e| start(format!("tmpfs volume {name}: {e}")))?;
                }
                PodVolume::Dir(source) => {
                    if !source.is_dir() {
                        return Err(start(format!(
                            "volume {name}: {} is not a directory",
                            source.display()
                        )));
                    }
                }
            }
        }
        let json = serde_json::to_vec_pretty(record).map_err(|e| start(e.to_string()))?;
        crate::durable::write_atomic(&dir.join("pod.json"), &json)
            .map_err(|e| io_err("writing", &dir.join("pod.json"), e))?;
        Ok(self.pod_paths(id, record))
    }

    fn pod_paths(&self, id: &str, record: &PodRecord) -> Pod {
        let dir = self.pods_dir().join(id);
        Pod {
            id: id.to_owned(),
            network: record.network,
            ipc: dir.join("ipc"),
            volumes: record
                .volumes
                .iter()
                .map(|(name, v)| {
                    let path = match v {
                        PodVolume::Dir(source) => source.clone(),
                        PodVolume::Ephemeral | PodVolume::Tmpfs { .. } => {
                            dir.join("volumes").join(name)
                        }
                    };
                    (name.clone(), path)
                })
                .collect(),
            dir,
        }
    }

    /// Pod `id`, if it exists.
    pub fn pod(&self, id: &str) -> Option<Pod> {
        let text = std::fs::read(self.pods_dir().join(id).join("pod.json")).ok()?;
        let record: PodRecord = serde_json::from_slice(&text).ok()?;
        Some(self.pod_paths(id, &record))
    }

    /// The ids of every pod (complete or not).
    pub fn pods(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pods_dir()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Takes pod `id` apart: its address, namespaces, tmpfs and ephemeral volumes (never a
    /// named or host volume's directory). Idempotent; its containers should be gone first.
    pub fn remove_pod(&self, id: &str) {
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            return;
        }
        let dir = self.pods_dir().join(id);
        if let Some(hook) = self.network_hook() {
            hook.release(id);
        }
        monitor::remove_ns(&dir.join("net"));
        monitor::remove_ns(&dir.join("ipc"));
        let volumes = dir.join("volumes");
        if let Ok(entries) = std::fs::read_dir(&volumes) {
            for e in entries.flatten() {
                let path = e.path();
                while monitor::is_mountpoint(&path) {
                    if nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH).is_err() {
                        break;
                    }
                }
            }
        }
        // Nothing under the pod dir is a mount any more: removing it cannot reach elsewhere
        // (remove_dir_all does not follow symlinks).
        let _ = std::fs::remove_dir_all(&dir);
    }
}
