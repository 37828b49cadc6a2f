//! The kernel's WireGuard, configured over generic netlink (the `wireguard` family, as `wg`
//! does). Used when the module is loaded or loadable; the link itself is created through
//! rtnetlink.
//!
//! Not wireguard-control: its pure-Rust releases (1.6+) pin x25519-dalek 2.0.x, which cannot
//! share a build with boringtun 0.6's pin on 2.0.0-rc.3, and 1.5 needs libclang to build. This
//! is the same protocol through the same netlink-packet-wireguard types it uses.

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

use super::super::{NetError, nl};
use super::{DeviceStatus, DeviceUpdate, INTERFACE, Key, PeerStatus};

/// Creates the kernel link `skiff-wg` unless it exists.
pub fn create_link() -> Result<nl::WireguardLink, NetError> {
    nl::with_handle(None, "creating the kernel WireGuard link", |h| async move {
        nl::create_wireguard_link(&h, INTERFACE).await
    })
}

fn err(what: &str, reason: impl std::fmt::Display) -> NetError {
    NetError::Netlink {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// Runs one generic netlink request on a private one-thread runtime.
fn request(
    msg: WireguardMessage,
    flags: u16,
    what: &'static str,
) -> Result<Vec<WireguardMessage>, NetError> {
    let thread = std::thread::spawn(move || -> Result<Vec<WireguardMessage>, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(what, e))?;
        rt.block_on(async move {
            let (conn, mut handle, _): (_, GenetlinkHandle, _) =
                genetlink::new_connection().map_err(|e| err(what, e))?;
            let task = tokio::spawn(conn);
            let mut header = NetlinkHeader::default();
            header.flags = flags;
            let nlmsg = NetlinkMessage::new(header, GenlMessage::from_payload(msg).into());
            let mut responses = handle.request(nlmsg).await.map_err(|e| err(what, e))?;
            let mut out = Vec::new();
            while let Some(r) = responses.next().await {
                let r = r.map_err(|e| err(what, e))?;
                match r.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m.payload),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(err(what, e.to_io()));
                    }
                    _ => {}
                }
            }
            task.abort();
            Ok(out)
        })
    });
    thread
        .join()
        .map_err(|_| err(what, "netlink thread panicked"))?
}

/// Reads the device.
pub fn get() -> Result<DeviceStatus, NetError> {
    let msgs = request(
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(INTERFACE.to_owned())],
        },
        NLM_F_REQUEST | NLM_F_DUMP,
        "reading the kernel WireGuard device",
    )?;
    let mut d = DeviceStatus::default();
    for m in msgs {
        for a in m.attributes {
            match a {
                WireguardAttribute::PublicKey(k) => d.public_key = Some(Key(k)),
                WireguardAttribute::ListenPort(p) => d.listen_port = p,
                WireguardAttribute::Peers(peers) => d.peers.extend(peers.iter().map(peer_status)),
                _ => {}
            }
        }
    }
    Ok(d)
}

fn peer_status(p: &WireguardPeer) -> PeerStatus {
    let mut s = PeerStatus::default();
    for a in p.iter() {
        match a {
            WireguardPeerAttribute::PublicKey(k) => s.public_key = Key(*k),
            WireguardPeerAttribute::Endpoint(e) => s.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => s.keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) => {
                s.last_handshake = (t.seconds != 0).then_some((t.seconds, t.nano_seconds));
            }
            WireguardPeerAttribute::RxBytes(b) => s.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => s.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let addr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                        _ => None,
                    });
                    let cidr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                        _ => None,
                    });
                    if let (Some(a), Some(c)) = (addr, cidr) {
                        s.allowed_ips.push((a, c));
                    }
                }
            }
            _ => {}
        }
    }
    s
}

/// Applies a change.
pub fn set(u: &DeviceUpdate) -> Result<(), NetError> {
    let mut attributes = vec![WireguardAttribute::IfName(INTERFACE.to_owned())];
    if let Some(k) = &u.private_key {
        attributes.push(WireguardAttribute::PrivateKey(k.0));
    }
    if let Some(p) = u.listen_port {
        attributes.push(WireguardAttribute::ListenPort(p));
    }
    if u.replace_peers {
        attributes.push(WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers,
        ));
    }
    if !u.peers.is_empty() {
        let peers = u
            .peers
            .iter()
            .map(|p| {
                let mut a = vec![WireguardPeerAttribute::PublicKey(p.public_key.0)];
                let mut flags = WireguardPeerFlags::empty();
                if p.remove {
                    flags |= WireguardPeerFlags::RemoveMe;
                }
                if p.replace_allowed_ips {
                    flags |= WireguardPeerFlags::ReplaceAllowedIps;
                }
                a.push(WireguardPeerAttribute::Flags(flags));
                if !p.remove {
                    if let Some(e) = p.endpoint {
                        a.push(WireguardPeerAttribute::Endpoint(e));
                    }
                    if let Some(k) = p.keepalive {
                        a.push(WireguardPeerAttribute::PersistentKeepalive(k));
                    }
                    let ips = p
                        .allowed_ips
                        .iter()
                        .map(|(ip, cidr)| {
                            WireguardAllowedIp(vec![
                                WireguardAllowedIpAttr::Family(if ip.is_ipv4() {
                                    WireguardAddressFamily::Ipv4
                                } else {
                                    WireguardAddressFamily::Ipv6
                                }),
                                WireguardAllowedIpAttr::IpAddr(*ip),
                                WireguardAllowedIpAttr::Cidr(*cidr),
                            ])
                        })
                        .collect();
                    a.push(WireguardPeerAttribute::AllowedIps(ips));
                }
                WireguardPeer(a)
            })
            .collect();
        attributes.push(WireguardAttribute::Peers(peers));
    }
    request(
        WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        },
        NLM_F_REQUEST | NLM_F_ACK,
        "configuring the kernel WireGuard device",
    )?;
    Ok(())
}
