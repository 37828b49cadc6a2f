//! The data directory's identity: which member it belongs to and the addresses and formation
//! it was first started with, so a restart needs only `--id` and `--data-dir`. A directory
//! that is not a Skiff controller's, or is another member's, is refused. A lock file keeps a
//! second process off a directory in use.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Formation;

const IDENTITY_FILE: &str = "skiff-controller.json";
const LOCK_FILE: &str = "LOCK";
const KIND: &str = "skiff-controller";
const FORMAT: u32 = 1;

/// What the data dir remembers about its member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub kind: String,
    pub format: u32,
    pub id: u64,
    pub rpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub formation: Formation,
}

/// Problems with the data dir, each naming the directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data dir {path} is not empty and is not a skiff controller data dir (no {IDENTITY_FILE})"
    )]
    Foreign { path: PathBuf },
    #[error("data dir {path}: {IDENTITY_FILE} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("data dir {path} belongs to member {found}, not member {wanted}")]
    OtherMember {
        path: PathBuf,
        found: u64,
        wanted: u64,
    },
    #[error("data dir {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error(
        "data dir {path}: member {id} was created with {field} {was}; changing it is not supported (remove the member and add a new one)"
    )]
    AddressChanged {
        path: PathBuf,
        id: u64,
        field: &'static str,
        was: SocketAddr,
    },
}

/// An opened, locked data dir.
#[derive(Debug)]
pub struct DataDir {
    pub path: PathBuf,
    pub identity: Identity,
    /// True when this start created the identity (a member that has never run).
    pub fresh: bool,
    _lock: fs::File,
}

impl DataDir {
    /// Opens `path` for member `id`, creating it on first start with the given addresses.
    pub fn open(
        path: &Path,
        id: u64,
        rpc_addr: Option<SocketAddr>,
        http_addr: Option<SocketAddr>,
        formation: &Formation,
    ) -> Result<DataDir, DataDirError> {
        let io = |source| DataDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(path).map_err(io)?;
        // The log and snapshots hold the cluster CA's key: a data dir that is ours is the
        // owner's alone (a foreign one is refused below, untouched).
        let private = || {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io)
        };
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(DataDirError::Locked {
                path: path.to_path_buf(),
            });
        }
        let ident_path = path.join(IDENTITY_FILE);
        match fs::read(&ident_path) {
            Ok(bytes) => {
                let identity: Identity =
                    serde_json::from_slice(&bytes).map_err(|e| DataDirError::Corrupt {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                if identity.kind != KIND || identity.format != FORMAT {
                    return Err(DataDirError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!("kind {:?} format {}", identity.kind, identity.format),
                    });
                }
                if identity.id != id {
                    return Err(DataDirError::OtherMember {
                        path: path.to_path_buf(),
                        found: identity.id,
                        wanted: id,
                    });
                }
                for (field, given, was) in [
                    ("rpc-addr", rpc_addr, identity.rpc_addr),
                    ("http-addr", http_addr, identity.http_addr),
                ] {
                    if let Some(g) = given
                        && g != was
                    {
                        return Err(DataDirError::AddressChanged {
                            path: path.to_path_buf(),
                            id,
                            field,
                            was,
                        });
                    }
                }
                private()?;
                Ok(DataDir {
                    path: path.to_path_buf(),
                    identity,
                    fresh: false,
                    _lock: lock,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let foreign = fs::read_dir(path)
                    .map_err(io)?
                    .filter_map(Result::ok)
                    .any(|e| e.file_name() != LOCK_FILE);
                if foreign {
                    return Err(DataDirError::Foreign {
                        path: path.to_path_buf(),
                    });
                }
                let identity = Identity {
                    kind: KIND.to_string(),
                    format: FORMAT,
                    id,
                    rpc_addr: rpc_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700))),
                    http_addr: http_addr
                        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7780))),
                    formation: formation.clone(),
                };
                write_atomic(path, IDENTITY_FILE, &identity).map_err(io)?;
                private()?;
                Ok(DataDir {
                    path: path.to_path_buf(),
                    identity,
                    fresh: true,
                    _lock: lock,
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Where openraft's log and snapshots live.
    pub fn raft_dir(&self) -> PathBuf {
        self.path.join("raft")
    }
}

fn write_atomic(dir: &Path, name: &str, value: &Identity) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_identity_and_refuses_strangers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("d");
        let rpc: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let d = DataDir::open(&dir, 4, Some(rpc), None, &Formation::Bootstrap).expect("create");
        assert!(d.fresh);
        // A second process cannot open it while the first holds it.
        assert!(matches!(
            DataDir::open(&dir, 4, None, None, &Formation::Wait),
            Err(DataDirError::Locked { .. })
        ));
        drop(d);
        let d = DataDir::open(&dir, 4, None, None, &Formation::Wait).expect("reopen");
        assert!(!d.fresh);
        assert_eq!(d.identity.rpc_addr, rpc);
        assert_eq!(d.identity.formation, Formation::Bootstrap);
        drop(d);
        let err = DataDir::open(&dir, 5, None, None, &Formation::Wait).expect_err("other member");
        assert!(
            err.to_string()
                .contains("belongs to member 4, not member 5"),
            "{err}"
        );

        let foreign = tmp.path().join("f");
        fs::create_dir_all(&foreign).expect("mkdir");
        fs::write(foreign.join("something"), b"x").expect("write");
        let err =
            DataDir::open(&foreign, 1, None, None, &Formation::Bootstrap).expect_err("foreign");
        assert!(
            err.to_string().contains("not a skiff controller data dir"),
            "{err}"
        );
    }
}
