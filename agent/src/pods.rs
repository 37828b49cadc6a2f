//! The real runtime behind the reconciler ([`crate::reconcile::Containers`]): allocations as
//! pods of the `skiff-runtime` crate, their named volumes ([`crate::volumes`]), host volumes
//! checked against the node's policy, and host ports ([`crate::net::hostport`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_runtime::container::{RunOptions, Runtime};
use skiff_runtime::devices::DeviceNode;
use skiff_runtime::pod::{PodNetwork, PodVolume};
use skiff_runtime::store::{Mount, NetworkAttach, State};

use crate::contract::{Assigned, Check, ContainerTask, Lifecycle, Task, VolumeKind};
use crate::health::Probe;
use crate::net::hostport;
use crate::policy::Policy;
use crate::reconcile::{ALLOC_LABEL, CONTAINER_LABEL, Containers, LIFECYCLE_LABEL, Observed};
use crate::volumes::{VolumeKey, Volumes};

/// The node's runtime as the reconciler uses it.
pub struct NodeRuntime {
    pub runtime: Arc<Runtime>,
    pub volumes: Volumes,
    pub policy: Arc<Policy>,
    /// The node's advertise address, where host ports are published.
    pub advertise: IpAddr,
    /// The allocations with host port rules: read from iptables once (rules from before a
    /// restart are adopted), then kept here, so a reconcile pass does not list the nat table.
    published: Mutex<BTreeSet<String>>,
    /// The mesh sidecars.
    pub mesh: Arc<crate::mesh::Mesh>,
    /// The node's fencing lease (the containers of fenced jobs stop when it runs out).
    pub lease: Arc<crate::fence::Lease>,
}

impl NodeRuntime {
    pub fn new(
        runtime: Arc<Runtime>,
        volumes: Volumes,
        policy: Arc<Policy>,
        advertise: IpAddr,
        mesh: Arc<crate::mesh::Mesh>,
        lease: Arc<crate::fence::Lease>,
    ) -> NodeRuntime {
        NodeRuntime {
            runtime,
            volumes,
            policy,
            advertise,
            published: Mutex::new(hostport::published()),
            mesh,
            lease,
        }
    }

    /// Starts the allocation's mesh sidecar if its job is in the mesh and it is not running.
    fn ensure_mesh(&self, alloc: &Assigned, task: &Task) -> Result<(), String> {
        let Some(mesh) = &task.mesh else {
            return Ok(());
        };
        let pod = self
            .runtime
            .pod(&alloc.id)
            .ok_or_else(|| format!("pod {} is gone", alloc.id))?;
        self.mesh.ensure(alloc, mesh, task, &pod.dir.join("net"))
    }

    fn published(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The host directory of each of the task's volumes (named ones made if missing).
    fn pod_volumes(
        &self,
        alloc: &Assigned,
        task: &Task,
    ) -> Result<BTreeMap<String, PodVolume>, String> {
        task.volumes
            .iter()
            .map(|v| {
                let source = match &v.kind {
                    VolumeKind::Ephemeral => PodVolume::Ephemeral,
                    VolumeKind::Tmpfs(size) => PodVolume::Tmpfs { size: *size },
                    VolumeKind::Named => {
                        let key = VolumeKey::new(&alloc.namespace, &alloc.job, &v.name)?;
                        PodVolume::Dir(self.volumes.ensure(&key)?)
                    }
                    VolumeKind::Host(path) => {
                        PodVolume::Dir(self.policy.host_volume(&v.name, path)?)
                    }
                };
                Ok((v.name.clone(), source))
            })
            .collect()
    }

    /// The allocations on this node that mount named volume `key`.
    pub fn volume_users(&self, key: &VolumeKey) -> Vec<String> {
        let Ok(list) = self.runtime.store().list() else {
            return Vec::new();
        };
        let data = self.volumes.data_dir(key);
        let mut users: Vec<String> = list
            .into_iter()
            .filter(|(c, _)| c.mounts.iter().any(|m| m.source == data))
            .filter_map(|(c, _)| c.labels.get(ALLOC_LABEL).cloned())
            .collect();
        for pod in self.runtime.pods() {
            if self
                .runtime
                .pod(&pod)
                .is_some_and(|p| p.volumes.values().any(|v| *v == data))
            {
                users.push(pod);
            }
        }
        users.sort();
        users.dedup();
        users
    }
}

impl Containers for NodeRuntime {
    fn list(&self) -> Result<Vec<Observed>, String> {
        let list = self.runtime.store().list().map_err(|e| e.to_string())?;
        Ok(list
            .into_iter()
            .filter_map(|(c, state)| {
                let alloc = c.labels.get(ALLOC_LABEL)?.clone();
                Some(Observed {
                    id: c.id,
                    alloc,
                    name: c.labels.get(CONTAINER_LABEL).cloned().unwrap_or_default(),
                    lifecycle: match c.labels.get(LIFECYCLE_LABEL).map(String::as_str) {
                        Some("init") => Lifecycle::Init,
                        Some("sidecar") => Lifecycle::Sidecar,
                        _ => Lifecycle::Main,
                    },
                    state,
                    stop_grace: Duration::from_millis(c.stop_grace_ms),
                })
            })
            .collect())
    }

    fn pods(&self) -> Vec<String> {
        let mut pods = self.runtime.pods();
        // Host port rules and sidecars left by an allocation whose pod is gone are its too.
        for alloc in self
            .published()
            .iter()
            .cloned()
            .chain(self.mesh.allocations())
            .collect::<Vec<_>>()
            .iter()
        {
            if !pods.contains(alloc) {
                pods.push(alloc.clone());
            }
        }
        pods
    }

    fn create_pod(&self, alloc: &Assigned, task: &Task) -> Result<(), String> {
        if self.runtime.pod(&alloc.id).is_some() {
            return self.ensure_mesh(alloc, task);
        }
        let volumes = self.pod_volumes(alloc, task)?;
        let pod = self
            .runtime
            .create_pod(&alloc.id, task.network, &volumes)
            .map_err(|e| e.to_string())?;
        let published: Vec<hostport::Published> = task
            .ports
            .iter()
            .filter_map(|p| {
                p.host_port.map(|h| hostport::Published {
                    host_port: h,
                    port: p.port,
                    udp: p.udp,
                })
            })
            .collect();
        if !published.is_empty() {
            let addr = self.runtime.address(&alloc.id).ok_or_else(|| {
                self.runtime.remove_pod(&alloc.id);
                format!("pod {}: no address to publish host ports to", pod.id)
            })?;
            if let Err(e) = hostport::publish(&alloc.id, self.advertise, addr, &published) {
                self.runtime.remove_pod(&alloc.id);
                return Err(e);
            }
            self.published().insert(alloc.id.clone());
        }
        self.ensure_mesh(alloc, task)
    }

    fn ensure_sidecar(&self, alloc: &Assigned, task: &Task) -> Result<(), String> {
        if self.runtime.pod(&alloc.id).is_none() {
            return Ok(());
        }
        self.ensure_mesh(alloc, task)
    }

    fn stop_sidecar(&self, alloc: &str) {
        self.mesh.remove(alloc);
    }

    fn remove_pod(&self, alloc: &str) {
        // After its containers (the caller stopped them), before its namespace.
        self.mesh.remove(alloc);
        if self.published().remove(alloc) {
            hostport::unpublish(alloc);
        }
        self.runtime.remove_pod(alloc);
    }

    fn start(
        &self,
        alloc: &Assigned,
        task: &Task,
        c: &ContainerTask,
        devices: &[DeviceNode],
        dns: Option<Ipv4Addr>,
    ) -> Result<String, String> {
        let pod = self
            .runtime
            .pod(&alloc.id)
            .ok_or_else(|| format!("pod {} is gone", alloc.id))?;
        let mounts = c
            .mounts
            .iter()
            .map(|m| {
                let source = pod
                    .volumes
                    .get(&m.volume)
                    .cloned()
                    .ok_or_else(|| format!("volume {} is not in the pod", m.volume))?;
                Ok(Mount {
                    source,
                    target: m.path.clone(),
                    read_only: m.read_only,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let lifecycle = match c.lifecycle {
            Lifecycle::Init => "init",
            Lifecycle::Sidecar => "sidecar",
            Lifecycle::Main => "main",
        };
        // A one-container allocation keeps the allocation id as its container's name (as
        // before groups); in a group each is `<alloc>-<container>`, cut to a valid name.
        let name = if task.containers.len() == 1 {
            alloc.id.clone()
        } else {
            let full = format!("{}-{}", alloc.id, c.name);
            full.chars()
                .take(63)
                .collect::<String>()
                .trim_end_matches('-')
                .to_owned()
        };
        let network = pod.network_attach();
        let opts = RunOptions {
            image: c.image.clone(),
            name: Some(name),
            cmd: c.args.clone(),
            entrypoint: c.entrypoint.clone(),
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            hostname: Some(alloc.id.chars().take(63).collect()),
            user: None,
            cwd: None,
            limits: c.limits.clone(),
            restart: c.restart,
            stop_signal: Some(c.stop_signal),
            stop_grace: Some(c.stop_grace),
            pull: skiff_runtime::image::PullPolicy::Missing,
            // Host mode uses the node's resolver as it is; a pod of its own asks the node's DNS.
            resolv_conf: match (&network, dns) {
                (NetworkAttach::Host, _) | (_, None) => None,
                (_, Some(server)) => Some(crate::dns::resolv_conf(server, &alloc.namespace)),
            },
            labels: [
                (ALLOC_LABEL.to_owned(), alloc.id.clone()),
                (CONTAINER_LABEL.to_owned(), c.name.clone()),
                (LIFECYCLE_LABEL.to_owned(), lifecycle.to_owned()),
            ]
            .into(),
            devices: devices.to_vec(),
            network,
            ipc: Some(pod.ipc.clone()),
            mounts,
            init: c.init,
            fence: task.stop_after.map(|d| skiff_runtime::fence::Fence {
                lease: self.lease.path().to_owned(),
                after_ms: d.as_millis() as u64,
            }),
        };
        let (id, mut monitor) = self.runtime.run(&opts).map_err(|e| e.to_string())?;
        // The monitor is our child until we exit: reap it when it ends.
        std::thread::spawn(move || {
            let _ = monitor.wait();
        });
        Ok(id)
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<State, String> {
        self.runtime.stop(id, grace).map_err(|e| e.to_string())
    }

    fn request_stop(&self, id: &str, grace: Duration) -> Result<(), String> {
        self.runtime
            .request_stop(id, grace)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn remove(&self, id: &str) -> Result<(), String> {
        self.runtime.remove(id, true).map_err(|e| e.to_string())
    }

    fn address(&self, alloc: &str, container: &str) -> Option<IpAddr> {
        match self.runtime.pod(alloc) {
            Some(pod) if pod.network == PodNetwork::Host => Some(self.advertise),
            Some(pod) if pod.network == PodNetwork::None => None,
            Some(_) => self.runtime.address(alloc),
            // A container from before groups has an address of its own.
            None => self.runtime.address(container),
        }
    }

    fn probe(&self, alloc: &str, container: &str, check: &Check) -> Probe {
        let netns = match self.runtime.pod(alloc) {
            Some(pod) if pod.network == PodNetwork::Host => None,
            Some(pod) => Some(pod.dir.join("net")),
            // A container from before groups has a namespace of its own.
            None => Some(skiff_runtime::monitor::netns_path(
                self.runtime.data_dir(),
                container,
            )),
        };
        Probe::new(
            check,
            self.runtime.data_dir(),
            container,
            netns,
            self.address(alloc, container),
        )
    }

    fn tail(&self, id: &str, lines: usize) -> String {
        let records =
            skiff_runtime::logs::read_all(&self.runtime.store().dir(id)).unwrap_or_default();
        let start = records.len().saturating_sub(lines);
        records[start..]
            .iter()
            .map(|r| r.text.trim_end())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    fn oom_kills(&self, id: &str) -> u64 {
        match self.runtime.stats(id) {
            Ok(Some((stats, _))) => stats.oom_kills,
            _ => 0,
        }
    }
}
