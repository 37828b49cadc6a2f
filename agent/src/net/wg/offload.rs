//! TUN offloads for the userspace tunnel, as the kernel's virtio-net interface gives them
//! (`IFF_VNET_HDR` with `TUNSETOFFLOAD`): every packet read from or written to the device
//! starts with a `virtio_net_hdr`.
//!
//! - **Reading** ([`Segments::split`]): with TSO on, the kernel hands over a TCP super-packet
//!   of up to 64 KiB (one per `read`) with the segment size in the header; it is cut here into
//!   the packets the wire carries, each with its own IPv4 header (length, id, checksum) and TCP
//!   header (sequence number, FIN/PSH only on the last, checksum). A packet with a partial
//!   checksum (`NEEDS_CSUM`) has it completed ([`complete_checksum`]).
//! - **Writing** ([`Coalescer`]): consecutive TCP segments of one flow, in order, are joined
//!   back into one super-packet for a single `write` (the receiving TCP stack then handles one
//!   packet instead of forty), the way the kernel's GRO joins them: same addresses, ports,
//!   acknowledgement, flags, window and options, sequence numbers that follow on, every
//!   segment but the last of the same size. Each segment's checksum is verified before it is
//!   joined, since a joined packet goes up with its checksum marked as to be computed.
//!
//! Only IPv4 TCP is segmented and joined (the overlay is IPv4; TSO6 is not switched on). All
//! of it is plain byte handling, tested against the kernel's rules below.

use std::ops::Range;

/// `sizeof(struct virtio_net_hdr)`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header's sum.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// The largest IPv4 packet.
const MAX_IP_LEN: usize = 65535;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// What was wrong with a packet the device handed over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("packet of {0} bytes is shorter than its virtio-net header")]
    NoHeader(usize),
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    #[error("GSO packet is not IPv4 TCP")]
    NotTcp4,
    #[error("checksum offset {at} outside a packet of {len} bytes")]
    ChecksumOutside { at: usize, len: usize },
    #[error("malformed headers: {0}")]
    Headers(&'static str),
    #[error("GSO segment size 0")]
    ZeroSegment,
}

/// `struct virtio_net_hdr` (host byte order, as a TUN device without TUNSETVNETLE/BE uses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn decode(b: &[u8]) -> Result<Self, OffloadError> {
        if b.len() < VNET_HDR_LEN {
            return Err(OffloadError::NoHeader(b.len()));
        }
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b` (which must have them).
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// The one's-complement sum of `data` (RFC 1071) added to `initial`, not yet folded: 32-bit
/// big-endian words summed into 64 bits, which folds to the same 16-bit sum.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_be_bytes(tail));
    }
    acc
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 pseudo-header's sum for a transport segment of `len` bytes.
fn pseudo_v4(ip: &[u8], proto: u8, len: usize) -> u64 {
    sum(&ip[12..20], u64::from(proto) + len as u64)
}

/// Fills in a partial checksum (`NEEDS_CSUM`): the field holds the pseudo-header's sum, the
/// rest is summed from `start` to the end.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start + offset;
    if at + 2 > pkt.len() {
        return Err(OffloadError::ChecksumOutside { at, len: pkt.len() });
    }
    let initial = u64::from(u16::from_be_bytes([pkt[at], pkt[at + 1]]));
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let mut c = !fold(sum(&pkt[start..], initial));
    // UDP (checksum at offset 6) sends a computed zero as all ones: zero means "none".
    if c == 0 && offset == 6 {
        c = 0xffff;
    }
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn ipv4_header_checksum(ip: &mut [u8], ihl: usize) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !fold(sum(&ip[..ihl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The IPv4 and TCP header lengths of `pkt`, checked against its length.
fn tcp4_headers(pkt: &[u8]) -> Result<(usize, usize), OffloadError> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return Err(OffloadError::NotTcp4);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < 20 || pkt[9] != PROTO_TCP {
        return Err(OffloadError::NotTcp4);
    }
    if pkt.len() < ihl + 20 {
        return Err(OffloadError::Headers(
            "shorter than its IPv4 and TCP headers",
        ));
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    if !(20..=60).contains(&thl) || pkt.len() < ihl + thl {
        return Err(OffloadError::Headers("bad TCP header length"));
    }
    Ok((ihl, thl))
}

/// The packets cut from one read: their bytes one after another, and where each is.
#[derive(Default)]
pub struct Segments {
    pub buf: Vec<u8>,
    pub ranges: Vec<Range<usize>>,
}

impl Segments {
    /// Cuts the IPv4 TCP super-packet `pkt` (the bytes after its header `hdr`) into packets
    /// of at most `hdr.gso_size` payload bytes each, with headers and checksums of their own.
    pub fn split(&mut self, pkt: &[u8], hdr: &VnetHdr) -> Result<(), OffloadError> {
        self.buf.clear();
        self.ranges.clear();
        if hdr.gso_type != GSO_TCPV4 {
            return Err(OffloadError::GsoType(hdr.gso_type));
        }
        let gso = usize::from(hdr.gso_size);
        if gso == 0 {
            return Err(OffloadError::ZeroSegment);
        }
        // The kernel's hdr_len is not to be trusted on the forwarding path (it can be the whole
        // first packet): the headers are read from the packet.
        let (ihl, thl) = tcp4_headers(pkt)?;
        let headers = ihl + thl;
        let payload = &pkt[headers..];
        let first_seq =
            u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
        let first_id = u16::from_be_bytes([pkt[4], pkt[5]]);
        let chunks = payload.len().div_ceil(gso).max(1);
        self.buf.reserve(pkt.len() + chunks * headers);
        for i in 0..chunks {
            let data = &payload[(i * gso).min(payload.len())..((i + 1) * gso).min(payload.len())];
            let start = self.buf.len();
            self.buf.extend_from_slice(&pkt[..headers]);
            self.buf.extend_from_slice(data);
            let out = &mut self.buf[start..];
            let total = headers + data.len();
            out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            out[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
            ipv4_header_checksum(out, ihl);
            let seq = first_seq.wrapping_add((i * gso) as u32);
            out[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < chunks {
                out[ihl + 13] &= !(TCP_FIN | TCP_PSH);
            }
            // Congestion window reduced is said once, in the first segment.
            if i > 0 {
                out[ihl + 13] &= !TCP_CWR;
            }
            out[ihl + 16] = 0;
            out[ihl + 17] = 0;
            let c = !fold(sum(&out[ihl..], pseudo_v4(out, PROTO_TCP, total - ihl)));
            out[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
            self.ranges.push(start..start + total);
        }
        Ok(())
    }
}

/// Whether the TCP checksum of an IPv4 packet (headers `ihl` long) is right.
fn tcp4_checksum_ok(pkt: &[u8], ihl: usize) -> bool {
    fold(sum(&pkt[ihl..], pseudo_v4(pkt, PROTO_TCP, pkt.len() - ihl))) == 0xffff
}

/// A joined packet being built.
struct Pending {
    ihl: usize,
    thl: usize,
    /// Payload bytes of the first segment; all but the last have it.
    gso: usize,
    segments: usize,
    next_seq: u32,
    /// A shorter segment or one with PSH ends the packet.
    closed: bool,
}

/// Joins consecutive TCP segments of a flow into super-packets for writes to a TUN device
/// with a virtio-net header; everything else is passed through in order.
pub struct Coalescer {
    /// The joined packet, after [`VNET_HDR_LEN`] bytes for its header.
    buf: Vec<u8>,
    pending: Option<Pending>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self {
            buf: Vec::with_capacity(VNET_HDR_LEN + MAX_IP_LEN),
            pending: None,
        }
    }
}

/// A segment that may be joined: its header lengths, sequence number and payload length.
fn candidate(pkt: &[u8]) -> Option<(usize, usize, u32, usize)> {
    let (ihl, thl) = tcp4_headers(pkt).ok()?;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // Fragments and packets whose length disagrees with their header are left alone.
    if total != pkt.len() || pkt[6] & 0x3f != 0 || pkt[7] != 0 {
        return None;
    }
    let flags = pkt[ihl + 13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let payload = pkt.len() - ihl - thl;
    if payload == 0 || !tcp4_checksum_ok(pkt, ihl) {
        return None;
    }
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    Some((ihl, thl, seq, payload))
}

impl Coalescer {
    /// Takes one packet: `frame` is [`VNET_HDR_LEN`] spare bytes followed by the packet.
    /// `write` is called with whole frames (header and packet) to go to the device, in order.
    pub fn push(&mut self, frame: &mut [u8], write: &mut impl FnMut(&[u8])) {
        let pkt = &frame[VNET_HDR_LEN..];
        let Some((ihl, thl, seq, payload)) = candidate(pkt) else {
            self.flush(write);
            VnetHdr::default().encode(frame);
            write(frame);
            return;
        };
        if self.joins(pkt, ihl, thl, seq, payload) {
            self.buf.extend_from_slice(&pkt[ihl + thl..]);
            let p = self.pending.as_mut().expect("joins checked it");
            p.segments += 1;
            p.next_seq = seq.wrapping_add(payload as u32);
            if payload < p.gso || pkt[ihl + 13] & TCP_PSH != 0 {
                p.closed = true;
                // The joined packet carries the last segment's PSH.
                let flags = pkt[ihl + 13];
                self.buf[VNET_HDR_LEN + ihl + 13] = flags;
            }
            return;
        }
        self.flush(write);
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(pkt);
        self.pending = Some(Pending {
            ihl,
            thl,
            gso: payload,
            segments: 1,
            next_seq: seq.wrapping_add(payload as u32),
            closed: pkt[ihl + 13] & TCP_PSH != 0,
        });
    }

    /// Whether `pkt` follows on from the pending packet.
    fn joins(&self, pkt: &[u8], ihl: usize, thl: usize, seq: u32, payload: usize) -> bool {
        let Some(p) = &self.pending else {
            return false;
        };
        let head = &self.buf[VNET_HDR_LEN..];
        p.ihl == ihl
            && p.thl == thl
            && !p.closed
            && seq == p.next_seq
            && payload <= p.gso
            && self.buf.len() - VNET_HDR_LEN + payload <= MAX_IP_LEN
            // Version, header length and TOS; DF and the fragment bits; TTL and protocol;
            // addresses.
            && head[..2] == pkt[..2]
            && head[6] == pkt[6]
            && head[8..10] == pkt[8..10]
            && head[12..ihl] == pkt[12..ihl]
            // Ports; acknowledgement; header length, flags but PSH, and window; options.
            && head[ihl..ihl + 4] == pkt[ihl..ihl + 4]
            && head[ihl + 8..ihl + 13] == pkt[ihl + 8..ihl + 13]
            && head[ihl + 13] & !TCP_PSH == pkt[ihl + 13] & !TCP_PSH
            && head[ihl + 14..ihl + 16] == pkt[ihl + 14..ihl + 16]
            && head[ihl + 20..ihl + thl] == pkt[ihl + 20..ihl + thl]
    }

    /// Writes the pending packet, if any: as it came when it is one segment, else as a GSO
    /// packet with its lengths, IPv4 checksum and partial TCP checksum set.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        let Some(p) = self.pending.take() else {
            return;
        };
        if p.segments == 1 {
            VnetHdr::default().encode(&mut self.buf);
            write(&self.buf);
            return;
        }
        let len = self.buf.len() - VNET_HDR_LEN;
        let (hdr, pkt) = self.buf.split_at_mut(VNET_HDR_LEN);
        pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ipv4_header_checksum(pkt, p.ihl);
        let pseudo = fold(pseudo_v4(pkt, PROTO_TCP, len - p.ihl));
        pkt[p.ihl + 16..p.ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (p.ihl + p.thl) as u16,
            gso_size: p.gso as u16,
            csum_start: p.ihl as u16,
            csum_offset: 16,
        }
        .encode(hdr);
        write(&self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPv4 TCP packet with correct checksums.
    fn tcp_packet(seq: u32, flags: u8, payload: &[u8], options: &[u8]) -> Vec<u8> {
        let thl = 20 + options.len();
        let total = 20 + thl + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 42, 1, 2]);
        p[16..20].copy_from_slice(&[10, 42, 2, 3]);
        ipv4_header_checksum(&mut p, 20);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&777u32.to_be_bytes());
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&502u16.to_be_bytes());
        t[20..thl].copy_from_slice(options);
        t[thl..].copy_from_slice(payload);
        let c = !fold(sum(&p[20..], pseudo_v4(&p, PROTO_TCP, total - 20)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn ip_ok(p: &[u8]) -> bool {
        fold(sum(&p[..20], 0)) == 0xffff
    }

    /// What the receiving stack sees of a written frame: its segments, as GSO would cut them.
    fn resegment(frame: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::decode(frame).expect("header");
        let pkt = &frame[VNET_HDR_LEN..];
        if hdr.gso_type == GSO_NONE {
            assert_eq!(hdr, VnetHdr::default());
            return vec![pkt.to_vec()];
        }
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(hdr.csum_start, 20);
        assert_eq!(hdr.csum_offset, 16);
        assert!(ip_ok(pkt), "joined IPv4 header checksum");
        // The partial checksum is the pseudo-header's: completing it gives the full one.
        let mut full = pkt.to_vec();
        complete_checksum(&mut full, 20, 16).expect("in range");
        assert!(tcp4_checksum_ok(&full, 20));
        let mut s = Segments::default();
        s.split(pkt, &hdr).expect("split");
        s.ranges.iter().map(|r| s.buf[r.clone()].to_vec()).collect()
    }

    #[test]
    fn a_super_packet_is_cut_into_checked_segments() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let big = tcp_packet(
            1000,
            TCP_ACK | TCP_PSH | TCP_FIN,
            &payload,
            &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        );
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut s = Segments::default();
        s.split(&big, &hdr).expect("split");
        assert_eq!(s.ranges.len(), 3);
        let mut rebuilt = Vec::new();
        for (i, r) in s.ranges.iter().enumerate() {
            let seg = &s.buf[r.clone()];
            assert!(ip_ok(seg), "segment {i} IPv4 checksum");
            assert!(tcp4_checksum_ok(seg, 20), "segment {i} TCP checksum");
            assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let flags = seg[33];
            if i < 2 {
                assert_eq!(flags, TCP_ACK);
            } else {
                assert_eq!(flags, TCP_ACK | TCP_PSH | TCP_FIN);
            }
            rebuilt.extend_from_slice(&seg[52..]);
        }
        assert_eq!(rebuilt, payload);
    }

    #[test]
    fn bad_super_packets_are_refused_not_panicked_on() {
        let mut s = Segments::default();
        let hdr = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        assert_eq!(s.split(&[0x45; 10], &hdr), Err(OffloadError::NotTcp4));
        let p = tcp_packet(1, TCP_ACK, &[0; 10], &[]);
        assert_eq!(
            s.split(&p, &VnetHdr { gso_size: 0, ..hdr }),
            Err(OffloadError::ZeroSegment)
        );
        assert_eq!(
            s.split(&p, &VnetHdr { gso_type: 4, ..hdr }),
            Err(OffloadError::GsoType(4))
        );
        let mut short = p.clone();
        short[32] = 0xf0; // TCP header of 60 bytes in a 50-byte packet
        assert!(s.split(&short, &hdr).is_err());
        assert!(complete_checksum(&mut [0u8; 10], 0, 16).is_err());
        assert!(VnetHdr::decode(&[0; 4]).is_err());
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut p = tcp_packet(5, TCP_ACK, b"hello world", &[]);
        let good = p.clone();
        let pseudo = fold(pseudo_v4(&p, PROTO_TCP, p.len() - 20));
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut p, 20, 16).expect("in range");
        assert_eq!(p, good);
    }

    #[test]
    fn in_order_segments_are_joined_and_others_pass_through() {
        let mut c = Coalescer::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut w = |f: &[u8]| out.push(f.to_vec());
        let frame = |p: Vec<u8>| {
            let mut f = vec![0xaa; VNET_HDR_LEN];
            f.extend(p);
            f
        };
        for i in 0..4u32 {
            let flags = if i == 3 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            c.push(
                &mut frame(tcp_packet(100 + i * 1000, flags, &[i as u8; 1000], &[])),
                &mut w,
            );
        }
        // A pure ACK is not joined, and ends nothing it does not belong to.
        c.push(&mut frame(tcp_packet(4100, TCP_ACK, &[], &[])), &mut w);
        // A segment with a bad checksum is passed through for the stack to drop.
        let mut bad = tcp_packet(4100, TCP_ACK, &[9; 1000], &[]);
        bad[60] ^= 1;
        c.push(&mut frame(bad.clone()), &mut w);
        c.flush(&mut w);
        assert_eq!(out.len(), 3);
        let segs = resegment(&out[0]);
        assert_eq!(segs.len(), 4);
        for (i, s) in segs.iter().enumerate() {
            let flags = if i == 3 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let want = tcp_packet(100 + i as u32 * 1000, flags, &[i as u8; 1000], &[]);
            // The same TCP segment; the IPv4 id is the joined packet's, counted up.
            assert_eq!(&s[20..], &want[20..], "segment {i}");
            assert_eq!(&s[..4], &want[..4]);
        }
        assert_eq!(
            &out[1][VNET_HDR_LEN..],
            &tcp_packet(4100, TCP_ACK, &[], &[])[..]
        );
        assert_eq!(&out[2][VNET_HDR_LEN..], &bad[..]);
    }

    #[test]
    fn gaps_and_changes_start_a_new_packet() {
        let frame = |p: Vec<u8>| {
            let mut f = vec![0; VNET_HDR_LEN];
            f.extend(p);
            f
        };
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut w = |f: &[u8]| out.push(f.to_vec());
        let mut c = Coalescer::default();
        c.push(&mut frame(tcp_packet(0, TCP_ACK, &[1; 500], &[])), &mut w);
        c.push(&mut frame(tcp_packet(600, TCP_ACK, &[2; 500], &[])), &mut w); // a gap
        let mut other_ack = tcp_packet(1100, TCP_ACK, &[3; 500], &[]);
        other_ack[28..32].copy_from_slice(&778u32.to_be_bytes());
        let pseudo = fold(pseudo_v4(&other_ack, PROTO_TCP, other_ack.len() - 20));
        other_ack[36..38].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut other_ack, 20, 16).expect("in range");
        c.push(&mut frame(other_ack), &mut w); // another acknowledgement
        c.push(
            &mut frame(tcp_packet(1600, TCP_ACK, &[4; 600], &[])),
            &mut w,
        ); // longer
        c.flush(&mut w);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|f| f[..VNET_HDR_LEN] == [0; VNET_HDR_LEN]));
    }

    proptest! {
        /// Cutting a super-packet and joining the pieces gives back what the stack would have
        /// seen, for any payload, segment size and options.
        #[test]
        fn split_then_join_round_trips(
            len in 1usize..8000,
            gso in 1usize..1500,
            seq in any::<u32>(),
            opts in prop::sample::select(vec![0usize, 4, 12, 40]),
            psh in any::<bool>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let big = tcp_packet(seq, flags, &payload, &vec![1u8; opts]);
            let hdr = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: gso as u16, csum_start: 20, csum_offset: 16, hdr_len: 0 };
            let mut s = Segments::default();
            s.split(&big, &hdr).expect("split");
            prop_assert_eq!(s.ranges.len(), len.div_ceil(gso));
            let mut c = Coalescer::default();
            let mut frames: Vec<Vec<u8>> = Vec::new();
            let mut w = |f: &[u8]| frames.push(f.to_vec());
            for r in &s.ranges {
                let mut f = vec![0u8; VNET_HDR_LEN];
                f.extend_from_slice(&s.buf[r.clone()]);
                c.push(&mut f, &mut w);
            }
            c.flush(&mut w);
            let mut seen = Vec::new();
            for f in &frames {
                seen.extend(resegment(f));
            }
            let want: Vec<Vec<u8>> = s.ranges.iter().map(|r| s.buf[r.clone()].to_vec()).collect();
            prop_assert_eq!(seen, want);
        }

        /// Arbitrary bytes from the device never panic the splitter or the joiner.
        #[test]
        fn arbitrary_bytes_are_handled(bytes in prop::collection::vec(any::<u8>(), 0..200), gso in 0u16..100) {
            let hdr = VnetHdr { gso_type: GSO_TCPV4, gso_size: gso, ..VnetHdr::default() };
            let _ = Segments::default().split(&bytes, &hdr);
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&bytes);
            let mut c = Coalescer::default();
            let mut n = 0;
            c.push(&mut f, &mut |_| n += 1);
            c.flush(&mut |_| n += 1);
            prop_assert_eq!(n, 1);
        }
    }
}
