//! Answers from the upstream resolvers, kept for their TTL: a name outside the zone asked
//! again is answered on the receiving task, as a zone name is, without a forward (what
//! CoreDNS's cache plugin and NodeLocal DNSCache do on a Kubernetes node).
//!
//! - **Key:** the question (name in lower case, type, class), the RD, AD and CD flags, and
//!   whether the query has EDNS and the DO bit. A query with EDNS options other than a cookie
//!   or padding (client subnet, say, which changes the answer), another EDNS version, or more
//!   than the question and its OPT record is neither answered from the cache nor kept.
//! - **What is kept:** a response over UDP to exactly that question (one question, the same
//!   name, type and class; see [`answers`]), not truncated, with no extended error, its OPT
//!   record (if any) the last record, and either NOERROR with answers, kept for the smallest
//!   TTL of its records, or NXDOMAIN or NODATA with the zone's SOA, kept for the smaller of
//!   the SOA's TTL and its MINIMUM (RFC 2308) and no longer than any record's TTL. Nothing
//!   else (SERVFAIL, REFUSED, a negative answer without a SOA), nothing larger than
//!   [`MAX_ANSWER`], nothing for longer than [`MAX_TTL`]. The upstream's OPT record (its
//!   cookie for the first asker, its payload size) is not kept.
//! - **A hit** is the kept answer with the asker's id and spelling of the name (0x20 case
//!   randomisation echoed), every TTL less the whole seconds it has been kept, and, for an
//!   EDNS query, this server's OPT record (version 0, payload [`super::EDNS_PAYLOAD`], the DO
//!   bit echoed). An answer larger than the asker gets over UDP (512 bytes without EDNS, else
//!   its payload size up to that of this server) is not served from the cache: the query is
//!   forwarded. An entry is gone once its TTL has run out.
//! - **Bounded:** at most [`MAX_ENTRIES`] answers of at most [`MAX_ANSWER`] bytes each; a
//!   full cache drops what has run out, then arbitrary entries until an eighth is free. It is
//!   shared by the node's containers: one that asks for many names pushes others' answers
//!   out (they are asked upstream again), as in any shared resolver cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 4096;
/// The largest answer kept (bytes).
pub const MAX_ANSWER: usize = 4096;
/// No answer is kept longer than this, whatever its TTL (seconds).
pub const MAX_TTL: u32 = 3600;

const HEADER: usize = 12;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
const RCODE_NOERROR: u8 = 0;
const RCODE_NXDOMAIN: u8 = 3;
/// EDNS options a query may carry and still be answered from the cache: COOKIE (its
/// answer's OPT record is ours, not the upstream's) and PADDING.
const HARMLESS_OPTIONS: [u16; 2] = [10, 12];

struct Entry {
    /// The answer without the upstream's OPT record.
    answer: Vec<u8>,
    /// Where each record's TTL is in `answer`.
    ttls: Vec<usize>,
    stored: Instant,
    keep: Duration,
}

/// The cache; shared by the server's sockets.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
}

/// What a query is, for the cache.
struct Asked {
    /// Where its question ends.
    q_end: usize,
    /// Its EDNS payload size and DO bit, if it has an OPT record.
    edns: Option<(u16, bool)>,
}

impl Asked {
    /// A query the cache may answer: one question, nothing else but an OPT record of version
    /// 0 with harmless options. `None` for anything else.
    fn of(query: &[u8]) -> Option<Asked> {
        // A query (QR clear) of opcode QUERY.
        if query.len() < HEADER
            || query[2] & 0xF8 != 0
            || u16_at(query, 4)? != 1
            || u16_at(query, 6)? != 0
            || u16_at(query, 8)? != 0
        {
            return None;
        }
        let q_end = skip_name(query, HEADER, false)? + 4;
        if q_end > query.len() {
            return None;
        }
        let edns = match u16_at(query, 10)? {
            0 if q_end == query.len() => None,
            1 => {
                // The OPT record: the root name, type, payload size, extended RCODE, version,
                // flags, options.
                if *query.get(q_end)? != 0 || u16_at(query, q_end + 1)? != TYPE_OPT {
                    return None;
                }
                let payload = u16_at(query, q_end + 3)?;
                let (version, flags) = (*query.get(q_end + 6)?, u16_at(query, q_end + 7)?);
                let rdlen = usize::from(u16_at(query, q_end + 9)?);
                let mut at = q_end + 11;
                if version != 0 || at + rdlen != query.len() {
                    return None;
                }
                while at < query.len() {
                    let (code, len) = (u16_at(query, at)?, usize::from(u16_at(query, at + 2)?));
                    if !HARMLESS_OPTIONS.contains(&code) {
                        return None;
                    }
                    at += 4 + len;
                }
                if at != query.len() {
                    return None;
                }
                Some((payload.max(512), flags & 0x8000 != 0))
            }
            _ => return None,
        };
        Some(Asked { q_end, edns })
    }

    fn key(&self, query: &[u8]) -> Vec<u8> {
        let (edns, dnssec_ok) = match self.edns {
            Some((_, d)) => (1, u8::from(d)),
            None => (0, 0),
        };
        // RD, AD and CD change what an upstream answers.
        let mut k = vec![query[2] & 0x01, query[3] & 0x30, edns, dnssec_ok];
        k.extend_from_slice(&query[HEADER..self.q_end]);
        // The name's bytes (labels' lengths are below 64, never letters).
        let name_end = k.len() - 4;
        k[4..name_end].make_ascii_lowercase();
        k
    }

    /// Whether the question's name is the zone's or under it (the wire form's last labels,
    /// without case).
    fn in_zone(&self, query: &[u8]) -> bool {
        const ZONE_WIRE: &[u8] = b"\x05skiff\x08internal\x00";
        let name = &query[HEADER..self.q_end - 4];
        name.len() >= ZONE_WIRE.len()
            && name[name.len() - ZONE_WIRE.len()..].eq_ignore_ascii_case(ZONE_WIRE)
    }

    /// The largest answer this asker gets over UDP: 512 bytes without EDNS, else its payload
    /// size up to the one this server advertises (as for zone answers).
    fn limit(&self) -> usize {
        self.edns.map_or(512, |(payload, _)| {
            usize::from(payload.min(super::EDNS_PAYLOAD))
        })
    }
}

/// Whether `answer` answers `query`: a response (QR) with its id and, for a query of one
/// question, that question (the name compared without case; type and class exactly).
pub(super) fn answers(query: &[u8], answer: &[u8]) -> bool {
    if query.len() < HEADER || answer.len() < HEADER || answer[..2] != query[..2] {
        return false;
    }
    if answer[2] & 0x80 == 0 {
        return false;
    }
    if u16_at(query, 4) != Some(1) {
        return true;
    }
    let Some(name_end) = skip_name(query, HEADER, false) else {
        return true;
    };
    let q_end = name_end + 4;
    q_end <= query.len()
        && answer.len() >= q_end
        && u16_at(answer, 4) == Some(1)
        && answer[HEADER..name_end].eq_ignore_ascii_case(&query[HEADER..name_end])
        && answer[name_end..q_end] == query[name_end..q_end]
}

/// The end of the name at `pos`; `compressed`: whether a pointer may end it (not in a
/// question). `None` when it runs off the message or is malformed.
fn skip_name(msg: &[u8], mut pos: usize, compressed: bool) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(pos)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xC0 if compressed => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
    None
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *msg.get(at)?,
        *msg.get(at + 1)?,
        *msg.get(at + 2)?,
        *msg.get(at + 3)?,
    ]))
}

/// An upstream's answer to the question ending at `q_end` as it is kept: without its OPT
/// record, with where its TTLs are, and for how long; `None` when it is not to be kept (see
/// the module's doc).
fn keepable(answer: &[u8], q_end: usize) -> Option<(Vec<u8>, Vec<usize>, u32)> {
    if answer.len() < HEADER || answer.len() > MAX_ANSWER {
        return None;
    }
    let flags = u16_at(answer, 2)?;
    let is_response = flags & 0x8000 != 0;
    let truncated = flags & 0x0200 != 0;
    let rcode = (flags & 0x000F) as u8;
    if !is_response || truncated || u16_at(answer, 4)? != 1 {
        return None;
    }
    let counts = [u16_at(answer, 6)?, u16_at(answer, 8)?, u16_at(answer, 10)?];
    let mut pos = q_end;
    let mut ttls = Vec::new();
    let mut min_ttl = MAX_TTL;
    let mut soa_keep = None;
    let mut opt_at = None;
    for (section, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            if opt_at.is_some() {
                // The OPT record was not the last.
                return None;
            }
            let start = pos;
            pos = skip_name(answer, pos, true)?;
            let rtype = u16_at(answer, pos)?;
            let ttl_at = pos + 4;
            let ttl = u32_at(answer, ttl_at)?;
            let rdlen = usize::from(u16_at(answer, pos + 8)?);
            pos = pos + 10 + rdlen;
            if pos > answer.len() {
                return None;
            }
            if rtype == TYPE_OPT {
                // The TTL field is the extended RCODE, version and flags: an extended error
                // (BADVERS and the like) is not an answer to keep.
                if section != 2 || ttl >> 24 != 0 {
                    return None;
                }
                opt_at = Some(start);
                continue;
            }
            ttls.push(ttl_at);
            min_ttl = min_ttl.min(ttl);
            if section == 1 && rtype == TYPE_SOA && rdlen >= 20 {
                let minimum = u32_at(answer, pos - 4)?;
                soa_keep = Some(ttl.min(minimum));
            }
        }
    }
    if pos != answer.len() {
        return None;
    }
    let keep = match rcode {
        RCODE_NOERROR if counts[0] > 0 => min_ttl,
        // Every record's TTL stays above 0 while it is kept.
        RCODE_NOERROR | RCODE_NXDOMAIN => soa_keep?.min(min_ttl),
        _ => return None,
    };
    if keep == 0 {
        return None;
    }
    let mut kept = answer.to_vec();
    if let Some(at) = opt_at {
        kept.truncate(at);
        kept[10..12].copy_from_slice(&(counts[2] - 1).to_be_bytes());
    }
    Some((kept, ttls, keep.min(MAX_TTL)))
}

impl Cache {
    /// The kept answer to `query`, made the asker's (see the module's doc).
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.answer_at(query, Instant::now())
    }

    fn answer_at(&self, query: &[u8], now: Instant) -> Option<Vec<u8>> {
        let asked = Asked::of(query)?;
        // Names of the zone are never forwarded, so never here: no lock taken for them.
        if asked.in_zone(query) {
            return None;
        }
        let k = asked.key(query);
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.get(&k)?;
        let age = now.saturating_duration_since(entry.stored);
        if age >= entry.keep {
            entries.remove(&k);
            return None;
        }
        let opt_len = if asked.edns.is_some() { 11 } else { 0 };
        if entry.answer.len() + opt_len > asked.limit() {
            return None;
        }
        let mut out = entry.answer.clone();
        let ttls = entry.ttls.clone();
        drop(entries);
        let aged = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        out[..2].copy_from_slice(&query[..2]);
        out[HEADER..asked.q_end].copy_from_slice(&query[HEADER..asked.q_end]);
        for at in ttls {
            let ttl = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(aged).to_be_bytes());
        }
        if let Some((_, dnssec_ok)) = asked.edns {
            let additional = u16::from_be_bytes([out[10], out[11]]).saturating_add(1);
            out[10..12].copy_from_slice(&additional.to_be_bytes());
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&super::EDNS_PAYLOAD.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        Some(out)
    }

    /// Keeps the upstream's `answer` to `query` (received over UDP), if it is one to keep.
    pub fn insert(&self, query: &[u8], answer: &[u8]) {
        self.insert_at(query, answer, Instant::now());
    }

    fn insert_at(&self, query: &[u8], answer: &[u8], now: Instant) {
        let Some(asked) = Asked::of(query) else {
            return;
        };
        let q_end = asked.q_end;
        if !answers(query, answer) {
            return;
        }
        let Some((kept, ttls, keep)) = keepable(answer, q_end) else {
            return;
        };
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            // What has run out goes first; if that is not an eighth, arbitrary entries go
            // until it is, so the next full scan is at least that many inserts away.
            entries.retain(|_, e| now.saturating_duration_since(e.stored) < e.keep);
            let excess = entries.len().saturating_sub(MAX_ENTRIES - MAX_ENTRIES / 8);
            let gone: Vec<Vec<u8>> = entries.keys().take(excess).cloned().collect();
            for k in gone {
                entries.remove(&k);
            }
        }
        entries.insert(
            asked.key(query),
            Entry {
                answer: kept,
                ttls,
                stored: now,
                keep: Duration::from_secs(u64::from(keep)),
            },
        );
    }

    /// Entries kept now (some may have run out).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use proptest::prelude::*;

    fn query(id: u16, name: &str, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    /// `query(.., edns = true)` with one more EDNS option (code, data) in its OPT record.
    fn with_option(mut q: Vec<u8>, code: u16, data: &[u8]) -> Vec<u8> {
        let rdlen_at = q.len() - 2;
        let rdlen = u16::from_be_bytes([q[rdlen_at], q[rdlen_at + 1]]);
        let added = u16::try_from(4 + data.len()).expect("small");
        q[rdlen_at..].copy_from_slice(&(rdlen + added).to_be_bytes());
        q.extend_from_slice(&code.to_be_bytes());
        q.extend_from_slice(&u16::try_from(data.len()).expect("small").to_be_bytes());
        q.extend_from_slice(data);
        q
    }

    /// The upstream's answer to `q`: its id and question, these records, this code.
    fn upstream(
        q: &[u8],
        code: ResponseCode,
        answers: &[(u32, [u8; 4])],
        soa: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let asked = Message::from_vec(q).expect("query");
        let mut m = Message::new(asked.metadata.id, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.metadata.response_code = code;
        let question = asked.queries[0].clone();
        let name = question.name().clone();
        m.add_query(question);
        for (ttl, ip) in answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                *ttl,
                RData::A(A::from(std::net::Ipv4Addr::from(*ip))),
            ));
        }
        if let Some((ttl, minimum)) = soa {
            let zone = Name::from_ascii("test.").expect("zone");
            let ns = Name::from_ascii("ns.test.").expect("ns");
            let mail = Name::from_ascii("hostmaster.test.").expect("mail");
            m.add_authority(Record::from_rdata(
                zone,
                ttl,
                RData::SOA(SOA::new(ns, mail, 1, 60, 10, 600, minimum)),
            ));
        }
        if let Some(e) = asked.edns.clone() {
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    fn ttls(answer: &[u8]) -> Vec<u32> {
        let m = Message::from_vec(answer).expect("decode");
        m.answers
            .iter()
            .chain(&m.authorities)
            .map(|r| r.ttl)
            .collect()
    }

    /// A kept answer goes to a later client with its id and spelling, its TTLs aged by the
    /// whole seconds kept, until the smallest runs out.
    #[test]
    fn an_answer_is_kept_for_its_smallest_ttl_and_aged() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let q1 = query(1, "www.Example.TEST.", true);
        cache.insert_at(
            &q1,
            &upstream(
                &q1,
                ResponseCode::NoError,
                &[(300, [198, 18, 0, 1]), (60, [198, 18, 0, 2])],
                None,
            ),
            t0,
        );
        let q2 = query(2, "WWW.example.test.", true);
        let hit = cache
            .answer_at(&q2, t0 + Duration::from_millis(10_500))
            .expect("hit");
        let m = Message::from_vec(&hit).expect("decode");
        assert_eq!(m.metadata.id, 2);
        assert_eq!(m.queries[0].name().to_ascii(), "WWW.example.test.");
        assert_eq!(ttls(&hit), [290, 50]);
        // The OPT record is this server's, not the upstream's.
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        assert_eq!(m.additionals.len(), 0);
        assert!(cache.answer_at(&q2, t0 + Duration::from_secs(60)).is_none());
        assert!(cache.is_empty(), "an entry that ran out is dropped");
    }

    /// NXDOMAIN and NODATA are kept as RFC 2308 says: the smaller of the SOA's TTL and its
    /// MINIMUM; without a SOA they are not kept.
    #[test]
    fn negative_answers_are_kept_for_the_soa_minimum() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let nx = query(3, "nope.example.test.", false);
        cache.insert_at(
            &nx,
            &upstream(&nx, ResponseCode::NXDomain, &[], Some((900, 30))),
            t0,
        );
        assert!(cache.answer_at(&nx, t0 + Duration::from_secs(29)).is_some());
        assert!(cache.answer_at(&nx, t0 + Duration::from_secs(30)).is_none());
        let nodata = query(4, "empty.example.test.", false);
        cache.insert_at(
            &nodata,
            &upstream(&nodata, ResponseCode::NoError, &[], Some((20, 300))),
            t0,
        );
        let hit = cache
            .answer_at(&nodata, t0 + Duration::from_secs(5))
            .expect("nodata kept");
        assert_eq!(ttls(&hit), [15]);
        let bare = query(5, "bare.example.test.", false);
        cache.insert_at(
            &bare,
            &upstream(&bare, ResponseCode::NXDomain, &[], None),
            t0,
        );
        assert!(cache.answer_at(&bare, t0).is_none());
    }

    /// What is not an answer to keep is not kept: another code, a cut answer, another question
    /// or id, an extended error in the OPT record, a TTL of 0.
    #[test]
    fn only_whole_answers_to_the_same_question_are_kept() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let q = query(6, "a.example.test.", true);
        let ok = upstream(&q, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None);
        let servfail = upstream(&q, ResponseCode::ServFail, &[], Some((60, 60)));
        let mut cut = ok.clone();
        cut[2] |= 0x02;
        let other_q = query(6, "b.example.test.", true);
        let other = upstream(
            &other_q,
            ResponseCode::NoError,
            &[(60, [198, 18, 0, 1])],
            None,
        );
        let mut other_id = ok.clone();
        other_id[1] ^= 1;
        let zero = upstream(&q, ResponseCode::NoError, &[(0, [198, 18, 0, 1])], None);
        let mut badvers = Message::from_vec(&ok).expect("decode");
        badvers.metadata.response_code = ResponseCode::BADVERS;
        let badvers = badvers.to_vec().expect("encode");
        for (what, answer) in [
            ("servfail", servfail),
            ("truncated", cut),
            ("another question", other),
            ("another id", other_id),
            ("ttl 0", zero),
            ("badvers", badvers),
            ("garbage", vec![0u8; 40]),
        ] {
            cache.insert_at(&q, &answer, t0);
            assert!(cache.answer_at(&q, t0).is_none(), "{what} was kept");
        }
        cache.insert_at(&q, &ok, t0);
        assert!(cache.answer_at(&q, t0).is_some());
        // The same name asked without EDNS is another question.
        assert!(
            cache
                .answer_at(&query(7, "a.example.test.", false), t0)
                .is_none()
        );
    }

    /// A client cookie does not change the question (the answer's OPT record is this
    /// server's); a client subnet option may change the answer, so such a query is neither
    /// kept nor answered; the DO bit and EDNS itself are part of the question.
    #[test]
    fn edns_options_and_flags_decide_what_is_the_same_question() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let q = query(1, "c.example.test.", true);
        cache.insert_at(
            &q,
            &upstream(&q, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None),
            t0,
        );
        let cookie = with_option(query(2, "c.example.test.", true), 10, &[7; 8]);
        let hit = cache.answer_at(&cookie, t0).expect("a cookie is harmless");
        let m = Message::from_vec(&hit).expect("decode");
        assert!(
            m.edns
                .as_ref()
                .is_some_and(|e| e.options().as_ref().is_empty()),
            "{m:?}"
        );
        let subnet = with_option(
            query(3, "c.example.test.", true),
            8,
            &[0, 1, 24, 0, 198, 18, 0],
        );
        assert!(cache.answer_at(&subnet, t0).is_none());
        cache.insert_at(
            &subnet,
            &upstream(
                &subnet,
                ResponseCode::NoError,
                &[(60, [198, 18, 0, 2])],
                None,
            ),
            t0,
        );
        assert!(cache.answer_at(&subnet, t0).is_none());
        // Kept, it would answer the same name asked without the option.
        let subnet_name = with_option(
            query(3, "s.example.test.", true),
            8,
            &[0, 1, 24, 0, 198, 18, 0],
        );
        cache.insert_at(
            &subnet_name,
            &upstream(
                &subnet_name,
                ResponseCode::NoError,
                &[(60, [198, 18, 0, 3])],
                None,
            ),
            t0,
        );
        assert!(
            cache
                .answer_at(&query(8, "s.example.test.", true), t0)
                .is_none(),
            "a client-subnet answer was kept"
        );
        assert!(
            cache
                .answer_at(&query(4, "c.example.test.", false), t0)
                .is_none()
        );
        let mut dnssec = query(5, "c.example.test.", true);
        let flags_at = dnssec.len() - 4;
        dnssec[flags_at] |= 0x80;
        assert!(
            cache.answer_at(&dnssec, t0).is_none(),
            "DO is another question"
        );
    }

    /// An answer larger than the asker takes over UDP is not served from the cache.
    #[test]
    fn an_answer_too_large_for_the_asker_is_not_served() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let many: Vec<(u32, [u8; 4])> = (0..40).map(|i| (60, [198, 18, 1, i])).collect();
        let q = query(1, "big.example.test.", true);
        let answer = upstream(&q, ResponseCode::NoError, &many, None);
        assert!(answer.len() > 512 && answer.len() < 1232);
        cache.insert_at(&q, &answer, t0);
        assert!(
            cache
                .answer_at(&query(2, "big.example.test.", true), t0)
                .is_some()
        );
        let plain = query(3, "big.example.test.", false);
        cache.insert_at(
            &plain,
            &upstream(&plain, ResponseCode::NoError, &many, None),
            t0,
        );
        assert!(
            cache.answer_at(&plain, t0).is_none(),
            "over 512 bytes without EDNS"
        );
    }

    /// Names of the zone (any case) are never looked up; others, however close, are.
    #[test]
    fn zone_names_are_not_looked_up() {
        let zone = super::super::ZONE;
        for (name, inside) in [
            (format!("web.default.{zone}."), true),
            (format!("{}.", zone.to_ascii_uppercase()), true),
            (format!("not{zone}."), false),
            (format!("{zone}.example.test."), false),
        ] {
            let q = query(1, &name, false);
            let asked = Asked::of(&q).expect("a query");
            assert_eq!(asked.in_zone(&q), inside, "{name}");
        }
    }

    /// An answer is the upstream's to that very query: the id, QR, and the question (the
    /// name in any case, the type and class exactly).
    #[test]
    fn an_answer_must_answer_the_question() {
        let q = query(1, "a.example.test.", false);
        let ok = upstream(&q, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None);
        assert!(answers(&q, &ok));
        let mut shouted = ok.clone();
        shouted[HEADER + 1..HEADER + 2].make_ascii_uppercase();
        assert!(answers(&q, &shouted));
        let name_end = skip_name(&q, HEADER, false).expect("name");
        let mut other_type = ok.clone();
        other_type[name_end + 1] = 97;
        assert!(!answers(&q, &other_type));
        let mut other_class = ok.clone();
        other_class[name_end + 3] = 3;
        assert!(!answers(&q, &other_class));
        let mut not_response = ok.clone();
        not_response[2] &= 0x7F;
        assert!(!answers(&q, &not_response));
        let mut other_id = ok;
        other_id[0] ^= 0xFF;
        assert!(!answers(&q, &other_id));
        assert!(!answers(&q, &[0u8; 5]));
    }

    /// Full, the cache frees an eighth at once (the next full scan is that many inserts
    /// away) and keeps what was just put in.
    #[test]
    fn the_cache_is_bounded() {
        let cache = Cache::default();
        let t0 = Instant::now();
        let mut sizes = Vec::new();
        for i in 0..MAX_ENTRIES + 50 {
            let q = query(1, &format!("n{i}.example.test."), false);
            cache.insert_at(
                &q,
                &upstream(&q, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None),
                t0,
            );
            assert!(cache.answer_at(&q, t0).is_some(), "n{i} was not kept");
            sizes.push(cache.len());
        }
        assert_eq!(sizes.iter().max(), Some(&MAX_ENTRIES));
        assert_eq!(
            sizes.last(),
            Some(&(MAX_ENTRIES - MAX_ENTRIES / 8 + 50)),
            "an eighth freed once"
        );
    }

    proptest! {
        /// Any bytes as a query or an upstream's answer: no panic, and whatever is answered
        /// from the cache is as long as the answer kept.
        #[test]
        fn garbage_never_panics(q in proptest::collection::vec(any::<u8>(), 0..80),
                                a in proptest::collection::vec(any::<u8>(), 0..200),
                                flip in 0usize..200) {
            let cache = Cache::default();
            let t0 = Instant::now();
            cache.insert_at(&q, &a, t0);
            if let Some(hit) = cache.answer_at(&q, t0) {
                prop_assert_eq!(hit.len(), a.len());
            }
            // A real answer with one byte changed.
            let real = query(9, "x.example.test.", true);
            let mut answer = upstream(&real, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None);
            let i = flip % answer.len();
            answer[i] ^= 0xA5;
            cache.insert_at(&real, &answer, t0);
            let _ = cache.answer_at(&real, t0 + Duration::from_secs(1));
        }
    }
}
