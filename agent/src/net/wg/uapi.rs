//! WireGuard's cross-platform userspace API (the text protocol `wg` speaks over
//! `/var/run/wireguard/IFACE.sock`, https://www.wireguard.com/xplatform/): encoding and parsing
//! of `get=1` and `set=1`, and a client. The tunnel process serves it; the agent and `wg` use it.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{DeviceStatus, DeviceUpdate, Key, PeerStatus, PeerUpdate};

/// A protocol or transport failure.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: the device answered errno={errno}")]
    Errno { path: String, errno: i32 },
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
    /// The `set=1` body (without the leading `set=1` line, with the closing blank line).
    pub fn to_uapi(&self) -> String {
        let mut s = String::new();
        if let Some(k) = &self.private_key {
            s += &format!("private_key={}\n", hex::encode(k.0));
        }
        if let Some(p) = self.listen_port {
            s += &format!("listen_port={p}\n");
        }
        if self.replace_peers {
            s += "replace_peers=true\n";
        }
        for p in &self.peers {
            s += &format!("public_key={}\n", hex::encode(p.public_key.0));
            if p.remove {
                s += "remove=true\n";
                continue;
            }
            if let Some(e) = p.endpoint {
                s += &format!("endpoint={e}\n");
            }
            if let Some(k) = p.keepalive {
                s += &format!("persistent_keepalive_interval={k}\n");
            }
            if p.replace_allowed_ips {
                s += "replace_allowed_ips=true\n";
            }
            for (ip, prefix) in &p.allowed_ips {
                s += &format!("allowed_ip={ip}/{prefix}\n");
            }
        }
        s += "\n";
        s
    }

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

    /// Parses a `get=1` answer up to (and checking) its `errno=` line.
    pub fn parse_uapi(lines: &mut dyn Iterator<Item = String>) -> Result<DeviceStatus, UapiError> {
        let mut d = DeviceStatus::default();
        for line in lines {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| parse_err(&line, "no '='"))?;
            let num = |what: &str| -> Result<u64, UapiError> {
                v.parse()
                    .map_err(|_| parse_err(&line, format!("bad {what}")))
            };
            match (k, d.peers.last_mut()) {
                ("errno", _) => {
                    let errno = num("errno")? as i32;
                    if errno != 0 {
                        return Err(UapiError::Errno {
                            path: String::new(),
                            errno,
                        });
                    }
                    return Ok(d);
                }
                ("private_key", None) => {
                    d.public_key = Some(Key(parse_key(&line, v)?.public()));
                }
                ("listen_port", None) => d.listen_port = num("port")? as u16,
                ("public_key", _) => d.peers.push(PeerStatus {
                    public_key: parse_key(&line, v)?,
                    ..PeerStatus::default()
                }),
                ("endpoint", Some(p)) => {
                    p.endpoint = v.parse::<SocketAddr>().ok();
                }
                ("last_handshake_time_sec", Some(p)) => {
                    let sec = num("time")? as i64;
                    let nsec = p.last_handshake.map_or(0, |h| h.1);
                    p.last_handshake = (sec != 0).then_some((sec, nsec));
                }
                ("last_handshake_time_nsec", Some(p)) => {
                    let nsec = num("time")? as i64;
                    if let Some(h) = &mut p.last_handshake {
                        h.1 = nsec;
                    }
                }
                ("tx_bytes", Some(p)) => p.tx_bytes = num("count")?,
                ("rx_bytes", Some(p)) => p.rx_bytes = num("count")?,
                ("persistent_keepalive_interval", Some(p)) => p.keepalive = num("interval")? as u16,
                ("allowed_ip", Some(p)) => p.allowed_ips.push(parse_allowed(&line, v)?),
                _ => {}
            }
        }
        Err(parse_err("", "the answer ended before errno="))
    }
}

fn connect(path: &Path) -> Result<UnixStream, UapiError> {
    let io = |source| UapiError::Io {
        path: path.display().to_string(),
        source,
    };
    let s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    Ok(s)
}

fn lines(s: UnixStream) -> impl Iterator<Item = String> {
    BufReader::new(s).lines().map_while(Result::ok)
}

/// `get=1` on the device at `path`.
pub fn get(path: &Path) -> Result<DeviceStatus, UapiError> {
    let mut s = connect(path)?;
    s.write_all(b"get=1\n\n").map_err(|source| UapiError::Io {
        path: path.display().to_string(),
        source,
    })?;
    DeviceStatus::parse_uapi(&mut lines(s)).map_err(|e| with_path(e, path))
}

/// `set=1` on the device at `path`.
pub fn set(path: &Path, update: &DeviceUpdate) -> Result<(), UapiError> {
    let mut s = connect(path)?;
    let body = format!("set=1\n{}", update.to_uapi());
    s.write_all(body.as_bytes())
        .map_err(|source| UapiError::Io {
            path: path.display().to_string(),
            source,
        })?;
    for line in lines(s) {
        if let Some(v) = line.strip_prefix("errno=") {
            let errno: i32 = v.trim().parse().unwrap_or(-1);
            if errno == 0 {
                return Ok(());
            }
            return Err(UapiError::Errno {
                path: path.display().to_string(),
                errno,
            });
        }
    }
    Err(UapiError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no errno= answer"),
    })
}

fn with_path(e: UapiError, path: &Path) -> UapiError {
    match e {
        UapiError::Errno { errno, .. } => UapiError::Errno {
            path: path.display().to_string(),
            errno,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips_and_bad_lines_are_named() {
        let u = DeviceUpdate {
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
        };
        let text = u.to_uapi();
        let parsed = DeviceUpdate::parse_uapi(&mut text.lines().map(str::to_owned)).expect("parse");
        assert_eq!(parsed, u);
        let bad = "public_key=zz\n\n";
        let err = DeviceUpdate::parse_uapi(&mut bad.lines().map(str::to_owned)).expect_err("bad");
        assert!(err.to_string().contains("key is not hex"), "{err}");
        let orphan = "endpoint=1.2.3.4:5\n\n";
        assert!(DeviceUpdate::parse_uapi(&mut orphan.lines().map(str::to_owned)).is_err());
    }

    #[test]
    fn get_answer_parses_as_wg_prints_it() {
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
        let text = format!("{}errno=0\n\n", status.to_uapi(Some(&Key([9; 32]))));
        let parsed = DeviceStatus::parse_uapi(&mut text.lines().map(str::to_owned)).expect("parse");
        assert_eq!(parsed, status);
    }
}
