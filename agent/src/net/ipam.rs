//! Pod addresses, persisted on disk like CNI's host-local plugin: one file per address in use
//! (named by the address, holding the container id), created exclusively so an address is
//! never handed out twice, even by two agents racing or across an agent restart. Allocation
//! goes round-robin from the last address handed out, so a freed address is not reused at once
//! (a peer still talking to the old container does not reach the new one).
//!
//! Every write is atomic and durable ([`skiff_runtime::durable`]): an address file appears
//! whole with its owner (a hard link of a complete, fsync'd temporary file, never an empty
//! file after a crash), `.last` is replaced by rename, and each change of the directory is
//! fsync'd; temporary names are unique per writer.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use skiff_runtime::durable;

use super::{NetError, Subnet};

pub struct Ipam {
    dir: PathBuf,
    subnet: Subnet,
}

impl Ipam {
    /// The store for `subnet` under `root` (created if missing).
    pub fn open(root: PathBuf, subnet: Subnet) -> Result<Ipam, NetError> {
        let dir = root.join(subnet.to_string().replace('/', "_"));
        std::fs::create_dir_all(&dir).map_err(|e| NetError::io(&dir, e))?;
        Ok(Ipam { dir, subnet })
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, NetError> {
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| NetError::io(&path, e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| NetError::io(&path, e.into()))
    }

    /// The address held by `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Ipv4Addr>, NetError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(_, owner)| owner == id)
            .map(|(ip, _)| ip))
    }

    /// Every address in use and its owner.
    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, NetError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| NetError::io(&self.dir, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
            out.push((ip, owner.trim().to_owned()));
        }
        out.sort();
        Ok(out)
    }

    /// Hands `id` an address (the one it already holds, if any).
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, NetError> {
        let _lock = self.lock()?;
        if let Some(ip) = self.get(id)? {
            return Ok(ip);
        }
        let first = self.subnet.first_host();
        let last = self.subnet.last_host();
        if first > last {
            return Err(NetError::Exhausted {
                subnet: self.subnet.to_string(),
            });
        }
        let last_path = self.dir.join(".last");
        let after = std::fs::read_to_string(&last_path)
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|l| (first..=last).contains(l))
            .unwrap_or(last);
        let count = last - first + 1;
        for step in 1..=count {
            let candidate = first + (after - first + step) % count;
            let ip = Ipv4Addr::from(candidate);
            let path = self.dir.join(ip.to_string());
            match durable::create_new(&path, id.as_bytes()) {
                Ok(true) => {
                    durable::write_atomic(&last_path, ip.to_string().as_bytes())
                        .map_err(|e| NetError::io(&last_path, e))?;
                    return Ok(ip);
                }
                Ok(false) => continue,
                Err(e) => return Err(NetError::io(&path, e)),
            }
        }
        Err(NetError::Exhausted {
            subnet: self.subnet.to_string(),
        })
    }

    /// Frees whatever `id` holds. Idempotent.
    pub fn release(&self, id: &str) -> Result<(), NetError> {
        let _lock = self.lock()?;
        for (ip, owner) in self.entries()? {
            if owner == id {
                let path = self.dir.join(ip.to_string());
                durable::remove(&path).map_err(|e| NetError::io(&path, e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().expect("subnet")
    }

    #[test]
    fn hands_out_each_address_once_round_robin_and_survives_reopening() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ipam = Ipam::open(tmp.path().to_path_buf(), subnet("10.42.3.0/29")).expect("open");
        // .1 is the gateway; .2 to .6 are for containers (.7 is broadcast).
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| ipam.allocate(&format!("c{i}")).expect("allocate"))
            .collect();
        assert_eq!(
            got,
            [
                "10.42.3.2",
                "10.42.3.3",
                "10.42.3.4",
                "10.42.3.5",
                "10.42.3.6"
            ]
            .map(|s| s.parse::<Ipv4Addr>().expect("ip"))
        );
        let err = ipam.allocate("c5").expect_err("full");
        assert_eq!(
            err.to_string(),
            "no free address in pod subnet 10.42.3.0/29"
        );
        // Asking again for the same container gives the same address.
        assert_eq!(ipam.allocate("c2").expect("same"), got[2]);
        ipam.release("c1").expect("release");
        ipam.release("c1").expect("release twice");
        // A new store over the same directory (an agent restart) knows what is taken.
        let again = Ipam::open(tmp.path().to_path_buf(), subnet("10.42.3.0/29")).expect("open");
        assert_eq!(again.get("c3").expect("get"), Some(got[3]));
        assert_eq!(again.allocate("c6").expect("allocate"), got[1]);
        assert!(again.allocate("c7").is_err());
    }

    #[test]
    fn a_freed_address_is_not_reused_at_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ipam = Ipam::open(tmp.path().to_path_buf(), subnet("10.42.0.0/24")).expect("open");
        let a = ipam.allocate("a").expect("a");
        ipam.release("a").expect("release");
        let b = ipam.allocate("b").expect("b");
        assert_ne!(a, b);
    }

    #[test]
    fn racing_allocations_never_share_an_address_and_leave_no_temporaries() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ipam = Ipam::open(tmp.path().to_path_buf(), subnet("10.42.5.0/26")).expect("open");
        let got: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let ipam = &ipam;
                    s.spawn(move || {
                        (0..7)
                            .map(|i| ipam.allocate(&format!("t{t}-{i}")).expect("allocate"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let distinct: std::collections::BTreeSet<_> = got.iter().collect();
        assert_eq!(distinct.len(), got.len(), "an address handed out twice");
        let stray: Vec<_> = std::fs::read_dir(&ipam.dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
        // Every address file holds its owner whole.
        for (ip, owner) in ipam.entries().expect("entries") {
            assert!(owner.starts_with('t'), "{ip}: {owner:?}");
        }
    }
}
