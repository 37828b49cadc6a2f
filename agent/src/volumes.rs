//! Named volumes: directories on this node that outlive the allocations mounting them, one per
//! (namespace, job, volume name), under `DATA_DIR/volumes/<namespace>/<job>/<name>/`: the
//! volume's files in `data/`, its record in `volume.json`. Made on first use; removed only by
//! `skiff volume rm` (refused while an allocation on this node mounts it). The controllers
//! learn which volumes a node holds from its heartbeats and keep the job's replicas there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One named volume's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeKey {
    pub namespace: String,
    pub job: String,
    pub name: String,
}

impl VolumeKey {
    /// Checks each part is a valid name (so a key is always one path component each).
    pub fn new(namespace: &str, job: &str, name: &str) -> Result<VolumeKey, String> {
        for (what, part) in [("namespace", namespace), ("job", job), ("volume", name)] {
            skiff_common::validate_name(what, part).map_err(|e| e.message)?;
        }
        Ok(VolumeKey {
            namespace: namespace.to_owned(),
            job: job.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.job, self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    created_at_ms: i64,
}

/// A named volume as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub key: VolumeKey,
    pub created_at_ms: i64,
    pub size_bytes: u64,
}

/// The named volumes of one agent data dir.
#[derive(Clone, Debug)]
pub struct Volumes {
    root: PathBuf,
}

impl Volumes {
    pub fn new(data_dir: &Path) -> Volumes {
        Volumes {
            root: data_dir.join("volumes"),
        }
    }

    fn dir(&self, key: &VolumeKey) -> PathBuf {
        self.root
            .join(&key.namespace)
            .join(&key.job)
            .join(&key.name)
    }

    /// Where the volume's files are (whether or not it exists).
    pub fn data_dir(&self, key: &VolumeKey) -> PathBuf {
        self.dir(key).join("data")
    }

    /// The volume's data directory, made (with its record) when it does not exist yet.
    pub fn ensure(&self, key: &VolumeKey) -> Result<PathBuf, String> {
        let dir = self.dir(key);
        let data = dir.join("data");
        if dir.join("volume.json").is_file() && data.is_dir() {
            return Ok(data);
        }
        std::fs::create_dir_all(&data)
            .map_err(|e| format!("named volume {key}: creating {}: {e}", data.display()))?;
        let record = serde_json::to_vec(&Record {
            created_at_ms: now_ms(),
        })
        .map_err(|e| e.to_string())?;
        skiff_runtime::durable::write_atomic(&dir.join("volume.json"), &record)
            .map_err(|e| format!("named volume {key}: {e}"))?;
        tracing::info!(volume = %key, "named volume created");
        Ok(data)
    }

    /// Every named volume on the node (complete ones: with their record).
    pub fn list(&self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        for ns in read_dirs(&self.root) {
            for job in read_dirs(&self.root.join(&ns)) {
                for name in read_dirs(&self.root.join(&ns).join(&job)) {
                    let Ok(key) = VolumeKey::new(&ns, &job, &name) else {
                        continue;
                    };
                    let dir = self.dir(&key);
                    let Some(record) = std::fs::read(dir.join("volume.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                    else {
                        continue;
                    };
                    out.push(VolumeInfo {
                        size_bytes: du(&dir.join("data")),
                        key,
                        created_at_ms: record.created_at_ms,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The keys of every named volume (for the heartbeat), without sizing them.
    pub fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ns in read_dirs(&self.root) {
            for job in read_dirs(&self.root.join(&ns)) {
                for name in read_dirs(&self.root.join(&ns).join(&job)) {
                    if let Ok(key) = VolumeKey::new(&ns, &job, &name)
                        && self.dir(&key).join("volume.json").is_file()
                    {
                        out.push(key.to_string());
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Removes a volume and its data. The caller checks that nothing mounts it. Returns
    /// whether it existed.
    pub fn remove(&self, key: &VolumeKey) -> Result<bool, String> {
        let dir = self.dir(key);
        if !dir.exists() {
            return Ok(false);
        }
        // The record goes first: a removal cut short leaves no volume that looks complete.
        let _ = std::fs::remove_file(dir.join("volume.json"));
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing named volume {key}: {e}"))?;
        for parent in [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            // Empty job and namespace directories go too (fails harmlessly if not empty).
            let _ = std::fs::remove_dir(parent);
        }
        tracing::info!(volume = %key, "named volume removed");
        Ok(true)
    }
}

fn read_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Bytes the files under `dir` take (symlinks not followed, other filesystems included).
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_made_once_listed_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = Volumes::new(dir.path());
        let key = VolumeKey::new("default", "app", "data").expect("key");
        let data = v.ensure(&key).expect("ensure");
        std::fs::write(data.join("f"), b"kept").expect("write");
        assert_eq!(v.ensure(&key).expect("again"), data);
        assert_eq!(std::fs::read(data.join("f")).expect("read"), b"kept");
        assert_eq!(v.keys(), ["default/app/data"]);
        let listed = v.list();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].size_bytes > 0);
        assert!(v.remove(&key).expect("remove"));
        assert!(v.keys().is_empty());
        assert!(!dir.path().join("volumes/default").exists());
        assert!(!v.remove(&key).expect("again"));
    }

    #[test]
    fn keys_are_names_never_paths() {
        for (ns, job, name) in [
            ("..", "a", "b"),
            ("a", "b/c", "d"),
            ("a", "b", ""),
            ("A", "b", "c"),
        ] {
            assert!(VolumeKey::new(ns, job, name).is_err(), "{ns}/{job}/{name}");
        }
    }
}
