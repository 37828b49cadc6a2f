//! Pod addresses, persisted on disk like CNI's host-local plugin: one file per address in use
//! (named by the address, holding the container id), created with `O_EXCL` so an address is
//! never handed out twice, even by two agents racing or across an agent restart. Allocation
//! goes round-robin from the last address handed out, so a freed address is not reused at once
//! (a peer still talking to the old container does not reach the new one).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;

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
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(id.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| NetError::io(&path, e))?;
                    let _ = nix::unistd::fsync(f.as_fd());
                    std::fs::write(&last_path, ip.to_string())
                        .map_err(|e| NetError::io(&last_path, e))?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
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
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(NetError::io(&path, e)),
                }
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
}
