//! WireGuard's cross-platform userspace API (the text protocol `wg` speaks over
//! `/run/wireguard/IFACE.sock`, https://www.wireguard.com/xplatform/), the server's side: the
//! tunnel process parses `set=1` requests and prints `get=1` answers. Clients (the agent through
//! `wireguard-control`, and `wg`) bring their own.

use std::net::IpAddr;

use super::{DeviceStatus, DeviceUpdate, Key, PeerUpdate};

/// A request the tunnel cannot take, naming the line.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("bad line {line:?}: {reason}")]
    Parse { line: String, reason: String },
}

fn parse_err(line: &str, reason: impl Into<String>) -> UapiError {
    UapiError::Parse {
        line: line.to_owned(),
        reason: reason.into(),
    }
}

fn parse_key(line: &str, v: &str) -> Result<Key, UapiError> {
    let bytes = hex::decode(v).map_err(|_| parse_err(line, "key is not hex"))?;
    bytes
        .try_into()
        .map(Key)
        .map_err(|_| parse_err(line, "key is not 32 bytes"))
}

fn parse_allowed(line: &str, v: &str) -> Result<(IpAddr, u8), UapiError> {
    let (ip, prefix) = v.split_once('/').unwrap_or((v, ""));
    let ip: IpAddr = ip.parse().map_err(|_| parse_err(line, "bad address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = if prefix.is_empty() {
        max
    } else {
        prefix.parse().map_err(|_| parse_err(line, "bad prefix"))?
    };
    if prefix > max {
        return Err(parse_err(line, "prefix too long"));
    }
    Ok((ip, prefix))
}

impl DeviceUpdate {
    /// Parses a `set=1` body, line by line, up to the blank line.
    pub fn parse_uapi(lines: &mut dyn Iterator<Item = String>) -> Result<DeviceUpdate, UapiError> {
        let mut u = DeviceUpdate::default();
        for line in lines {
            if line.is_empty() {
                return Ok(u);
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| parse_err(&line, "no '='"))?;
            match (k, u.peers.last_mut()) {
                ("private_key", None) => u.private_key = Some(parse_key(&line, v)?),
                ("listen_port", None) => {
                    u.listen_port = Some(v.parse().map_err(|_| parse_err(&line, "bad port"))?)
                }
                ("fwmark", None) => {}
                ("replace_peers", None) => u.replace_peers = v == "true",
                ("public_key", _) => u.peers.push(PeerUpdate {
                    public_key: parse_key(&line, v)?,
                    ..PeerUpdate::default()
                }),
                ("remove", Some(p)) => p.remove = v == "true",
                ("update_only", Some(_)) | ("preshared_key", Some(_)) => {}
                ("protocol_version", Some(_)) if v == "1" => {}
                ("endpoint", Some(p)) => {
                    p.endpoint = Some(v.parse().map_err(|_| parse_err(&line, "bad endpoint"))?)
                }
                ("persistent_keepalive_interval", Some(p)) => {
                    let k: u16 = v.parse().map_err(|_| parse_err(&line, "bad interval"))?;
                    p.keepalive = Some(k);
                }
                ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = v == "true",
                ("allowed_ip", Some(p)) => p.allowed_ips.push(parse_allowed(&line, v)?),
                _ => return Err(parse_err(&line, "unknown or misplaced key")),
            }
        }
        Err(parse_err("", "no blank line ends the request"))
    }
}

impl DeviceStatus {
    /// The `get=1` answer body (without `errno=`), as a device prints it.
    pub fn to_uapi(&self, private_key: Option<&Key>) -> String {
        let mut s = String::new();
        if let Some(k) = private_key {
            s += &format!("private_key={}\n", hex::encode(k.0));
        }
        s += &format!("listen_port={}\n", self.listen_port);
        for p in &self.peers {
            s += &format!("public_key={}\n", hex::encode(p.public_key.0));
            if let Some(e) = p.endpoint {
                s += &format!("endpoint={e}\n");
            }
            let (sec, nsec) = p.last_handshake.unwrap_or((0, 0));
            s += &format!(
                "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n\
                 tx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}\n",
                p.tx_bytes, p.rx_bytes, p.keepalive
            );
            for (ip, prefix) in &p.allowed_ips {
                s += &format!("allowed_ip={ip}/{prefix}\n");
            }
            s += "protocol_version=1\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::PeerStatus;
    use super::*;

    /// What `wireguard-control` (and `wg set`) send.
    #[test]
    fn set_requests_parse_and_bad_lines_are_named() {
        let text = "private_key=0707070707070707070707070707070707070707070707070707070707070707\n\
            listen_port=51820\n\
            public_key=0101010101010101010101010101010101010101010101010101010101010101\n\
            replace_allowed_ips=true\n\
            endpoint=198.18.0.3:51820\n\
            persistent_keepalive_interval=25\n\
            allowed_ip=10.42.1.0/24\n\
            public_key=0202020202020202020202020202020202020202020202020202020202020202\n\
            remove=true\n\n";
        let parsed = DeviceUpdate::parse_uapi(&mut text.lines().map(str::to_owned)).expect("parse");
        assert_eq!(
            parsed,
            DeviceUpdate {
                private_key: Some(Key([7; 32])),
                listen_port: Some(51820),
                replace_peers: false,
                peers: vec![
                    PeerUpdate {
                        public_key: Key([1; 32]),
                        endpoint: Some("198.18.0.3:51820".parse().expect("addr")),
                        keepalive: Some(25),
                        replace_allowed_ips: true,
                        allowed_ips: vec![("10.42.1.0".parse().expect("ip"), 24)],
                        remove: false,
                    },
                    PeerUpdate {
                        public_key: Key([2; 32]),
                        remove: true,
                        ..PeerUpdate::default()
                    },
                ],
            }
        );
        let bad = "public_key=zz\n\n";
        let err = DeviceUpdate::parse_uapi(&mut bad.lines().map(str::to_owned)).expect_err("bad");
        assert!(err.to_string().contains("key is not hex"), "{err}");
        let orphan = "endpoint=1.2.3.4:5\n\n";
        assert!(DeviceUpdate::parse_uapi(&mut orphan.lines().map(str::to_owned)).is_err());
        let unended = "listen_port=1\n";
        assert!(DeviceUpdate::parse_uapi(&mut unended.lines().map(str::to_owned)).is_err());
    }

    /// The answer as `wg show` and `wireguard-control` read it.
    #[test]
    fn get_answers_print_as_a_device_does() {
        let status = DeviceStatus {
            public_key: Some(Key(Key([9; 32]).public())),
            listen_port: 51820,
            peers: vec![PeerStatus {
                public_key: Key([3; 32]),
                endpoint: Some("198.18.0.4:51820".parse().expect("addr")),
                allowed_ips: vec![("10.42.2.0".parse().expect("ip"), 24)],
                last_handshake: Some((1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                keepalive: 25,
            }],
        };
        let text = status.to_uapi(Some(&Key([9; 32])));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "private_key=0909090909090909090909090909090909090909090909090909090909090909",
                "listen_port=51820",
                "public_key=0303030303030303030303030303030303030303030303030303030303030303",
                "endpoint=198.18.0.4:51820",
                "last_handshake_time_sec=1700000000",
                "last_handshake_time_nsec=5",
                "tx_bytes=20",
                "rx_bytes=10",
                "persistent_keepalive_interval=25",
                "allowed_ip=10.42.2.0/24",
                "protocol_version=1",
            ]
        );
    }
}
