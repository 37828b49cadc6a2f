//! Answers from the upstream resolvers, kept for their TTL: a name outside the zone asked
//! again is answered on the receiving task, as a zone name is, without a forward (what
//! CoreDNS's cache plugin and NodeLocal DNSCache do on a Kubernetes node).
//!
//! - **Key:** the query as the client sent it, after its id, with the question name in lower
//!   case: flags, question, EDNS record and options alike. Only an identical question is
//!   answered from the cache, with the client's id and its spelling of the name (0x20 case
//!   randomisation is echoed).
//! - **What is kept:** a response over UDP to exactly that question (one question, the same
//!   name, type and class), not truncated, with no extended error in its OPT record, and
//!   either NOERROR with answers, kept for the smallest TTL of its records, or NXDOMAIN or
//!   NODATA with the zone's SOA, kept for the smaller of the SOA's TTL and its MINIMUM
//!   (RFC 2308). Nothing else (SERVFAIL, REFUSED, a negative answer without a SOA), nothing
//!   larger than [`MAX_ANSWER`], nothing for longer than [`MAX_TTL`].
//! - **A hit** is the kept answer with every TTL less the whole seconds it has been kept (the
//!   OPT record's TTL field holds flags and is left alone); an entry is gone once its TTL has
//!   run out.
//! - **Bounded:** at most [`MAX_ENTRIES`]; a full cache first drops what has run out, then
//!   an arbitrary entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 4096;
/// The largest answer kept (bytes); with [`MAX_ENTRIES`], 16 MiB at most.
pub const MAX_ANSWER: usize = 4096;
/// No answer is kept longer than this, whatever its TTL (seconds).
pub const MAX_TTL: u32 = 3600;

const HEADER: usize = 12;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
const RCODE_NOERROR: u8 = 0;
const RCODE_NXDOMAIN: u8 = 3;

struct Entry {
    answer: Vec<u8>,
    /// Where each record's TTL is in `answer` (the OPT record's excepted).
    ttls: Vec<usize>,
    stored: Instant,
    keep: Duration,
}

/// The cache; shared by the server's sockets.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
}

/// Where the question of a one-question query ends, and the key of the query; `None` for
/// anything else.
fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.len() < HEADER || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let end = skip_name(msg, HEADER, false)? + 4;
    (end <= msg.len()).then_some(end)
}

fn key(query: &[u8], q_end: usize) -> Vec<u8> {
    let mut k = query[2..].to_vec();
    // The question name's bytes (labels' lengths are below 64, never letters).
    k[HEADER - 2..q_end - 4 - 2].make_ascii_lowercase();
    k
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

/// The TTL fields of an answer to the question ending at `q_end`, and how long it may be
/// kept; `None` when it is not to be kept (see the module's doc).
fn keepable(answer: &[u8], q_end: usize) -> Option<(Vec<usize>, u32)> {
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
    for (section, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            pos = skip_name(answer, pos, true)?;
            let rtype = u16_at(answer, pos)?;
            let ttl_at = pos + 4;
            let ttl = u32_at(answer, ttl_at)?;
            let rdlen = usize::from(u16_at(answer, pos + 8)?);
            let rdata = pos + 10;
            pos = rdata + rdlen;
            if pos > answer.len() {
                return None;
            }
            if rtype == TYPE_OPT {
                // The TTL field is the extended RCODE, version and flags: an extended error
                // (BADVERS and the like) is not an answer to keep.
                if ttl >> 24 != 0 {
                    return None;
                }
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
        RCODE_NOERROR | RCODE_NXDOMAIN => soa_keep?,
        _ => return None,
    };
    (keep > 0).then_some((ttls, keep.min(MAX_TTL)))
}

impl Cache {
    /// The kept answer to `query`, made the client's (its id and spelling, TTLs aged).
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.answer_at(query, Instant::now())
    }

    fn answer_at(&self, query: &[u8], now: Instant) -> Option<Vec<u8>> {
        let q_end = question_end(query)?;
        let k = key(query, q_end);
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
        let mut out = entry.answer.clone();
        let ttls = entry.ttls.clone();
        drop(entries);
        let aged = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        out[..2].copy_from_slice(&query[..2]);
        out[HEADER..q_end].copy_from_slice(&query[HEADER..q_end]);
        for at in ttls {
            let ttl = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(aged).to_be_bytes());
        }
        Some(out)
    }

    /// Keeps the upstream's `answer` to `query`, if it is one to keep.
    pub fn insert(&self, query: &[u8], answer: &[u8]) {
        self.insert_at(query, answer, Instant::now());
    }

    fn insert_at(&self, query: &[u8], answer: &[u8], now: Instant) {
        let Some(q_end) = question_end(query) else {
            return;
        };
        // The same question, name compared without case.
        if answer.len() < q_end
            || answer[..2] != query[..2]
            || !answer[HEADER..q_end].eq_ignore_ascii_case(&query[HEADER..q_end])
        {
            return;
        }
        let Some((ttls, keep)) = keepable(answer, q_end) else {
            return;
        };
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| now.saturating_duration_since(e.stored) < e.keep);
            if entries.len() >= MAX_ENTRIES
                && let Some(k) = entries.keys().next().cloned()
            {
                entries.remove(&k);
            }
        }
        entries.insert(
            key(query, q_end),
            Entry {
                answer: answer.to_vec(),
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
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
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
        // The OPT record is as the upstream sent it.
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
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

    #[test]
    fn the_cache_is_bounded() {
        let cache = Cache::default();
        let t0 = Instant::now();
        for i in 0..MAX_ENTRIES + 50 {
            let q = query(1, &format!("n{i}.example.test."), false);
            cache.insert_at(
                &q,
                &upstream(&q, ResponseCode::NoError, &[(60, [198, 18, 0, 1])], None),
                t0,
            );
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
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
