//! Link, address and route changes through rtnetlink, in the host's network namespace or in a
//! container's. Each call runs on a thread of its own (joined to the target namespace when one
//! is given, so the netlink socket is opened there) with a one-thread tokio runtime: callers
//! are synchronous (the reconciler's blocking threads) and never block the agent's runtime.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkWireguard, RouteMessageBuilder};

use super::NetError;

/// Runs `f` with a netlink handle, in the network namespace bound at `netns` (or ours).
pub fn with_handle<T, F, Fut>(netns: Option<&Path>, what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
{
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    let what_owned = what.to_owned();
    let thread = std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || -> Result<T, NetError> {
            if let Some(ns) = &netns {
                let file = std::fs::File::open(ns).map_err(|e| NetError::Netns {
                    path: ns.clone(),
                    reason: e.to_string(),
                })?;
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| NetError::Netns {
                        path: ns.clone(),
                        reason: e.to_string(),
                    },
                )?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::Netlink {
                    what: what_owned.clone(),
                    reason: e.to_string(),
                })?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| NetError::Netlink {
                        what: what_owned.clone(),
                        reason: e.to_string(),
                    })?;
                let task = tokio::spawn(conn);
                let out = f(handle).await.map_err(|e| NetError::Netlink {
                    what: what_owned,
                    reason: describe(&e),
                });
                task.abort();
                out
            })
        })
        .map_err(|e| NetError::Netlink {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    thread.join().map_err(|_| NetError::Netlink {
        what: what.to_owned(),
        reason: "netlink thread panicked".into(),
    })?
}

/// The kernel's error, as `ip` would say it (e.g. "File exists (os error 17)").
fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => std::io::Error::from_raw_os_error(-code.get()).to_string(),
            None => format!("{m:?}"),
        },
        other => other.to_string(),
    }
}

/// The errno of a netlink error, if the kernel sent one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A link's index by name, if it exists.
pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    Ok(link(h, name).await?.map(|l| l.header.index))
}

/// A link by name, if it exists.
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The MTU of the link that holds `addr`.
pub async fn mtu_of_address(
    h: &Handle,
    addr: std::net::IpAddr,
) -> Result<Option<u32>, rtnetlink::Error> {
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await? {
        let holds = a.attributes.iter().any(|at| match at {
            AddressAttribute::Address(x) | AddressAttribute::Local(x) => *x == addr,
            _ => false,
        });
        if holds {
            let index = a.header.index;
            let l = h
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await?;
            return Ok(l.as_ref().and_then(link_mtu));
        }
    }
    Ok(None)
}

/// Makes sure the bridge exists, is up, has `mtu` and exactly `gateway/prefix` as its IPv4
/// address.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<u32, rtnetlink::Error> {
    let index = match link_index(h, name).await? {
        Some(i) => i,
        None => {
            match h.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            link_index(h, name)
                .await?
                .ok_or(rtnetlink::Error::RequestFailed)?
        }
    };
    // A bridge whose address is not set takes the lowest of its ports' addresses: removing a
    // pod's veth could change it, and the other pods would keep sending to the old one (their
    // neighbour entry for the gateway) until it goes stale, tens of seconds without traffic.
    // An address set once is kept; it is derived from the gateway (locally administered).
    let [a, b, c, d] = gateway.octets();
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(mtu)
                .address(vec![0x02, 0x5b, a, b, c, d])
                .up()
                .build(),
        )
        .execute()
        .await?;
    set_only_address(h, index, gateway, prefix).await?;
    Ok(index)
}

/// Gives link `index` the IPv4 address `addr/prefix` and removes any other IPv4 address.
pub async fn set_only_address(
    h: &Handle,
    index: u32,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    let mut found = false;
    let mut stale = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs.try_next().await? {
        let v4 = a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(std::net::IpAddr::V4(x)) => Some(*x),
            _ => None,
        });
        if let Some(x) = v4 {
            if x == addr && a.header.prefix_len == prefix {
                found = true;
            } else {
                stale.push(a);
            }
        }
    }
    for a in stale {
        h.address().del(a).execute().await?;
    }
    if !found {
        h.address()
            .add(index, addr.into(), prefix)
            .replace()
            .execute()
            .await?;
    }
    Ok(())
}

/// Creates a veth pair `host`/`peer`, attaches `host` to the bridge (index) with `mtu`, up, and
/// moves `peer` into the namespace open as `netns_fd`.
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    bridge: u32,
    mtu: u32,
    netns_fd: std::os::fd::RawFd,
) -> Result<(), rtnetlink::Error> {
    if let Some(old) = link_index(h, host).await? {
        h.link().del(old).execute().await?;
    }
    h.link()
        .add(LinkVeth::new(host, peer).mtu(mtu).build())
        .execute()
        .await?;
    let host_index = link_index(h, host)
        .await?
        .ok_or(rtnetlink::Error::RequestFailed)?;
    let peer_index = link_index(h, peer)
        .await?
        .ok_or(rtnetlink::Error::RequestFailed)?;
    h.link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .setns_by_fd(netns_fd)
                .build(),
        )
        .execute()
        .await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .controller(bridge)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await?;
    Ok(())
}

/// Inside a container's namespace: renames `peer` to `eth0`, gives it `ip/prefix`, brings it
/// up and routes everything via `gateway`.
pub async fn configure_container_side(
    h: &Handle,
    peer: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<(), rtnetlink::Error> {
    let index = link_index(h, peer)
        .await?
        .ok_or(rtnetlink::Error::RequestFailed)?;
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .name("eth0".to_owned())
                .mtu(mtu)
                .build(),
        )
        .execute()
        .await?;
    h.address()
        .add(index, ip.into(), prefix)
        .replace()
        .execute()
        .await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    h.route().add(route).replace().execute().await?;
    Ok(())
}

/// Deletes a link by name if it exists.
pub async fn delete_link(h: &Handle, name: &str) -> Result<(), rtnetlink::Error> {
    if let Some(i) = link_index(h, name).await? {
        match h.link().del(i).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENODEV) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What [`create_wireguard_link`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireguardLink {
    Existed,
    Created,
    /// The kernel has no WireGuard.
    Unsupported,
}

/// Creates a kernel WireGuard link unless it exists.
pub async fn create_wireguard_link(
    h: &Handle,
    name: &str,
) -> Result<WireguardLink, rtnetlink::Error> {
    if link_index(h, name).await?.is_some() {
        return Ok(WireguardLink::Existed);
    }
    match h
        .link()
        .add(LinkWireguard::new(name).build())
        .execute()
        .await
    {
        Ok(()) => Ok(WireguardLink::Created),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(WireguardLink::Existed),
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(WireguardLink::Unsupported)
        }
        Err(e) => Err(e),
    }
}

/// Brings link `index` up with `mtu`.
pub async fn up_with_mtu(h: &Handle, index: u32, mtu: u32) -> Result<(), rtnetlink::Error> {
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
}

/// The IPv4 destinations (network, prefix) routed through link `index` in the main table.
pub async fn routes_via(h: &Handle, index: u32) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut out = Vec::new();
    let mut routes = h.route().get(filter).execute();
    while let Some(r) = routes.try_next().await? {
        let oif = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
        if oif && r.header.table == libc::RT_TABLE_MAIN {
            out.push(r);
        }
    }
    Ok(out)
}

/// A route's IPv4 destination.
pub fn route_dst(r: &RouteMessage) -> Option<(Ipv4Addr, u8)> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(x)) => {
            Some((*x, r.header.destination_prefix_length))
        }
        _ => None,
    })
}

/// Routes `net/prefix` through link `index`, preferring `src` as the source address.
pub async fn add_route(
    h: &Handle,
    net: Ipv4Addr,
    prefix: u8,
    index: u32,
    src: Ipv4Addr,
) -> Result<(), rtnetlink::Error> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net, prefix)
        .output_interface(index)
        .pref_source(src)
        .build();
    h.route().add(route).replace().execute().await
}
