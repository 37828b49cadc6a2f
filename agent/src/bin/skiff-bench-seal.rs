//! One WireGuard peer's transport crypto on one thread and on every core: packets of 1,420
//! bytes sealed (the tunnel's TUN-to-UDP direction) and opened (UDP-to-TUN) for a single peer,
//! by `net/wg/noise.rs` (sessions read-locked, an atomic counter: the threads run side by
//! side) and by boringtun's `Tunn` behind a mutex (how the tunnel used it: one thread at a
//! time per peer), in the same run, interleaved rounds, median and range.
//!
//!   target/release/skiff-bench-seal [--seconds 2] [--rounds 3]
//!
//! Sealing runs for `--seconds`; opening takes 100,000 messages sealed beforehand.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use skiff_agent::net::wg::noise::{Consumed, Device, Opened, Peer, Sealed};

const PACKET: usize = 1420;

#[derive(clap::Parser)]
struct Args {
    /// Seconds per measurement (at least 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Interleaved rounds (at least 1).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
}

fn from() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 2], 51820))
}

/// An IPv4 packet of [`PACKET`] bytes.
fn packet() -> Vec<u8> {
    let mut p = vec![0u8; PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 42, 1, 2]);
    p[16..20].copy_from_slice(&[10, 42, 2, 2]);
    p
}

/// Two ends of `noise.rs` with a session, the first its initiator.
fn ours() -> Result<(Peer, Peer)> {
    let (da, db) = (
        Arc::new(Device::new(rand::random())),
        Arc::new(Device::new(rand::random())),
    );
    let a = Peer::new(da.clone(), db.public(), 1, 0).context("a peer")?;
    let b = Peer::new(db.clone(), da.public(), 2, 0).context("a peer")?;
    let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
    let n = a.initiate(&mut buf).context("initiation")?;
    let Consumed::Initiation(i) = db.consume_initiation(&buf[..n], from(), &mut out) else {
        bail!("initiation not taken");
    };
    let Opened::Reply(n) = b.respond(&i, &mut out) else {
        bail!("no response");
    };
    let Opened::Reply(n) = a.open(&out[..n], from(), &mut buf) else {
        bail!("no keepalive");
    };
    if b.open(&buf[..n], from(), &mut out) != Opened::Nothing {
        bail!("keepalive not taken");
    }
    Ok((a, b))
}

/// Two boringtun ends with a session.
fn theirs() -> Result<(Tunn, Tunn)> {
    let (ka, kb) = (
        StaticSecret::from(rand::random::<[u8; 32]>()),
        StaticSecret::from(rand::random::<[u8; 32]>()),
    );
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
    let ip = Some(from().ip());
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false) else {
        bail!("boringtun: no initiation");
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(ip, init, &mut out) else {
        bail!("boringtun: no response");
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(ip, resp, &mut buf) else {
        bail!("boringtun: no keepalive");
    };
    let _ = b.decapsulate(ip, keepalive, &mut out);
    Ok((a, b))
}

/// Runs `work` (one call per packet, given the thread's buffer) on `threads` threads for
/// `seconds`; Gbit/s of packets done.
fn measure(threads: usize, seconds: u64, work: &(dyn Fn(&mut [u8]) -> bool + Sync)) -> f64 {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        n += u64::from(work(&mut buf));
                    }
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let secs = start.elapsed().as_secs_f64();
    done.load(Ordering::Relaxed) as f64 * (PACKET * 8) as f64 / secs / 1e9
}

/// Messages opened per figure.
const OPENED: usize = 100_000;

/// Opens every message of `msgs` on `threads` threads, each taking the next from a shared
/// cursor; Gbit/s of packets opened (a message a replay window refused is not counted).
fn open_all(
    threads: usize,
    msgs: &[Vec<u8>],
    open: &(dyn Fn(&[u8], &mut [u8]) -> bool + Sync),
) -> f64 {
    let cursor = std::sync::atomic::AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 4096];
                let mut n = 0u64;
                loop {
                    let i = cursor.fetch_add(1, Ordering::Relaxed);
                    let Some(m) = msgs.get(i) else { break };
                    n += u64::from(open(m, &mut buf));
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    done.load(Ordering::Relaxed) as f64 * (PACKET * 8) as f64 / secs / 1e9
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pkt = packet();
    let cases = [
        "skiff seal",
        "boringtun seal",
        "skiff open",
        "boringtun open",
    ];
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 2]; cases.len()];
    for _round in 0..args.rounds {
        for (ti, threads) in [1, cores].into_iter().enumerate() {
            let (a, _b) = ours()?;
            results[0][ti].push(measure(threads, args.seconds, &|buf| {
                matches!(a.seal(&pkt, buf), Sealed::Data(_))
            }));
            let (ta, _tb) = theirs()?;
            let ta = Mutex::new(ta);
            results[1][ti].push(measure(threads, args.seconds, &|buf| {
                let mut t = ta.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                matches!(t.encapsulate(&pkt, buf), TunnResult::WriteToNetwork(_))
            }));
            // Opening: messages sealed beforehand, taken by the threads in counter order
            // from a shared cursor (as one socket's datagrams arrive).
            let (a, b) = ours()?;
            let msgs: Vec<Vec<u8>> = (0..OPENED)
                .map(|_| {
                    let mut m = vec![0u8; PACKET + 64];
                    match a.seal(&pkt, &mut m) {
                        Sealed::Data(n) => m.truncate(n),
                        _ => m.clear(),
                    }
                    m
                })
                .collect();
            results[2][ti].push(open_all(threads, &msgs, &|m, buf| {
                matches!(b.open(m, from(), buf), Opened::Packet(..))
            }));
            let (mut ta, tb) = theirs()?;
            let msgs: Vec<Vec<u8>> = (0..OPENED)
                .map(|_| {
                    let mut m = vec![0u8; PACKET + 64];
                    match ta.encapsulate(&pkt, &mut m) {
                        TunnResult::WriteToNetwork(p) => p.to_vec(),
                        _ => Vec::new(),
                    }
                })
                .collect();
            let tb = Mutex::new(tb);
            results[3][ti].push(open_all(threads, &msgs, &|m, buf| {
                let mut t = tb.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                matches!(
                    t.decapsulate(Some(from().ip()), m, buf),
                    TunnResult::WriteToTunnelV4(..)
                )
            }));
        }
    }
    println!(
        "One peer, {PACKET}-byte packets, {} s per figure, {} interleaved rounds; \
         Gbit/s, median (range):",
        args.seconds, args.rounds
    );
    println!("| case | 1 thread | {cores} threads | {cores} threads / 1 |");
    println!("|---|---|---|---|");
    for (c, name) in cases.iter().enumerate() {
        let one = median(results[c][0].clone());
        let all = median(results[c][1].clone());
        let ratios: Vec<f64> = results[c][0]
            .iter()
            .zip(&results[c][1])
            .map(|(o, a)| a / o)
            .collect();
        let r = median(ratios);
        let range = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} ({lo:.2} to {hi:.2})");
        let ratio = format!("{:.2}x ({:.2} to {:.2})", r.0, r.1, r.2);
        println!("| {name} | {} | {} | {ratio} |", range(one), range(all));
    }
    Ok(())
}
