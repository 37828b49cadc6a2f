//! Property tests of the node DNS server's request handler, [`dns::answer`] (query bytes in,
//! answer bytes out, from a [`Zone`]): arbitrary bytes and mutated queries never make it panic;
//! a message without a whole header gets no answer; a message that does not parse gets no
//! answer or a FORMERR/SERVFAIL one; every answer is a well-formed response to the query's id
//! that fits a UDP client's payload size; a well-formed query for the zone is answered
//! authoritatively with its own question, and one for any other name is forwarded.
//!
//! Bounded: each property runs a fixed number of cases (see [`config`]).

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use skiff_agent::dns::{self, Reply, Zone};
use skiff_proto::v1 as pb;

/// `cases` cases, or `PROPTEST_CASES` when set (for a longer hunt by hand).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        max_shrink_iters: 4096,
        // Failures are reported with their input; no regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The zone.

fn endpoint(allocation: &str, ip: &str, ready: bool) -> pb::ServiceEndpoint {
    pb::ServiceEndpoint {
        allocation: allocation.into(),
        node: "n1".into(),
        ip: ip.into(),
        ready,
        ..Default::default()
    }
}

fn port(name: &str, number: u32, protocol: pb::Protocol) -> pb::ServicePort {
    pb::ServicePort {
        name: name.into(),
        port: number,
        protocol: protocol as i32,
    }
}

/// A zone like a real one: two services, one with enough endpoints that its SRV answer does
/// not fit in 512 bytes.
fn sample_zone() -> Zone {
    let many: Vec<pb::ServiceEndpoint> = (0..40)
        .map(|i| endpoint(&format!("bbbb{i:012}"), &format!("10.42.3.{}", i + 2), true))
        .collect();
    Zone::build(&[
        pb::ServiceInfo {
            name: "web".into(),
            namespace: "default".into(),
            job: "web".into(),
            port_name: "http".into(),
            ports: vec![
                port("http", 8080, pb::Protocol::Tcp),
                port("dns", 53, pb::Protocol::Udp),
            ],
            endpoints: vec![
                endpoint("aaaa000000000001", "10.42.1.2", true),
                endpoint("aaaa000000000002", "10.42.2.2", true),
                endpoint("aaaa000000000003", "10.42.1.3", false),
            ],
            ..Default::default()
        },
        pb::ServiceInfo {
            name: "big".into(),
            namespace: "shop".into(),
            job: "big".into(),
            port_name: "api".into(),
            ports: vec![port("api", 9000, pb::Protocol::Tcp)],
            endpoints: many,
            ..Default::default()
        },
    ])
}

const ZONE_NAMES: &[&str] = &[
    "web.default.skiff.internal",
    "WEB.Default.Skiff.Internal",
    "_http._tcp.web.default.skiff.internal",
    "_dns._udp.web.default.skiff.internal",
    "aaaa000000000001.web.default.skiff.internal",
    "aaaa000000000003.web.default.skiff.internal",
    "big.shop.skiff.internal",
    "_api._tcp.big.shop.skiff.internal",
    "default.skiff.internal",
    "skiff.internal",
    "nope.default.skiff.internal",
    "a.b.c.d.e.f.skiff.internal",
    "skiff.internal.example.org",
    "example.org",
    "internal",
    "",
];

// ---------------------------------------------------------------------------------------------
// Queries on the wire, built by hand so that they can be anything.

#[derive(Debug, Clone)]
struct Question {
    labels: Vec<Vec<u8>>,
    qtype: u16,
    qclass: u16,
}

#[derive(Debug, Clone)]
struct Query {
    id: u16,
    /// Byte 2: QR, opcode, AA, TC, RD.
    flags: u8,
    /// Byte 3: RA, Z, AD, CD, RCODE.
    flags2: u8,
    questions: Vec<Question>,
    /// An OPT record with this payload size, and the TTL field (extended rcode, version, DO).
    edns: Option<(u16, u32)>,
}

fn name_labels(name: &str) -> Vec<Vec<u8>> {
    name.split('.')
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

fn encode_name(out: &mut Vec<u8>, labels: &[Vec<u8>]) {
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

impl Query {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(self.flags);
        out.push(self.flags2);
        out.extend_from_slice(&(self.questions.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&u16::from(self.edns.is_some()).to_be_bytes());
        for q in &self.questions {
            encode_name(&mut out, &q.labels);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        if let Some((payload, ttl)) = self.edns {
            out.push(0);
            out.extend_from_slice(&41u16.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out
    }
}

fn qtype() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => select(vec![1u16, 28, 33, 255, 16, 6, 2, 5, 12]),
        1 => any::<u16>(),
    ]
}

/// Label text: mostly what names are made of, sometimes any bytes.
fn label() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => "[a-z0-9_-]{1,20}".prop_map(String::into_bytes),
        1 => "[A-Za-z0-9]{1,63}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 1..64),
    ]
}

fn question() -> impl Strategy<Value = Question> {
    (
        prop_oneof![
            4 => select(ZONE_NAMES.to_vec()).prop_map(name_labels),
            // A random prefix in front of the zone, or a random name.
            2 => (prop::collection::vec(label(), 0..4), any::<bool>()).prop_map(|(mut l, zone)| {
                if zone {
                    l.extend(name_labels(dns::ZONE));
                }
                l
            }),
            // Longer than a name may be (255 octets): still in the zone.
            1 => (5usize..9).prop_map(|n| {
                let mut l = vec![vec![b'x'; 63]; n];
                l.extend(name_labels("web.default.skiff.internal"));
                l
            }),
        ],
        qtype(),
        prop_oneof![8 => Just(1u16), 1 => any::<u16>()],
    )
        .prop_map(|(labels, qtype, qclass)| Question {
            labels,
            qtype,
            qclass,
        })
}

fn query() -> impl Strategy<Value = Query> {
    (
        any::<u16>(),
        prop_oneof![
            6 => select(vec![0u8, 1]),
            1 => any::<u8>(),
        ],
        prop_oneof![6 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![
            12 => prop::collection::vec(question(), 1..=1),
            1 => prop::collection::vec(question(), 0..4),
        ],
        prop::option::weighted(
            0.3,
            (
                prop_oneof![select(vec![0u16, 511, 512, 1232, 4096]), any::<u16>()],
                prop_oneof![Just(0u32), any::<u32>()],
            ),
        ),
    )
        .prop_map(|(id, flags, flags2, questions, edns)| Query {
            id,
            flags,
            flags2,
            questions,
            edns,
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    /// Overwrite one of the four section counts.
    Count(usize, u16),
    /// Overwrite bytes 2 and 3 (QR, opcode, flags, rcode).
    Flags(u8, u8),
    /// Put a compression pointer at an offset.
    Pointer(prop::sample::Index, u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let idx = any::<prop::sample::Index>();
    prop_oneof![
        3 => (idx.clone(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => idx.clone().prop_map(Mutation::Truncate),
        1 => (idx.clone(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (idx.clone(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        2 => (0usize..4, prop_oneof![0u16..4, any::<u16>()]).prop_map(|(i, n)| Mutation::Count(i, n)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flags(a, b)),
        1 => (idx, prop_oneof![0u16..64, 0u16..0x3fff]).prop_map(|(i, p)| Mutation::Pointer(i, p)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, x) => {
            if !bytes.is_empty() {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
        Mutation::Insert(i, b) => {
            let i = i.index(bytes.len() + 1);
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let i = i.index(bytes.len() + 1);
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Count(i, n) => {
            let at = 4 + 2 * i;
            if bytes.len() >= at + 2 {
                bytes[at..at + 2].copy_from_slice(&n.to_be_bytes());
            }
        }
        Mutation::Flags(a, b) => {
            if bytes.len() >= 4 {
                bytes[2] = *a;
                bytes[3] = *b;
            }
        }
        Mutation::Pointer(i, p) => {
            if bytes.len() >= 2 {
                let i = i.index(bytes.len() - 1);
                bytes[i..i + 2].copy_from_slice(&(0xc000 | p).to_be_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What every reply must satisfy.

fn is_in_zone(name: &str) -> bool {
    name == dns::ZONE || name.ends_with(&format!(".{}", dns::ZONE))
}

/// Checks the reply to `query` (answered for UDP when `udp`); returns the parsed answer.
fn check_reply(query: &[u8], udp: bool, zone: &Zone) -> Result<Option<Message>, TestCaseError> {
    let reply = dns::answer(query, zone, udp);
    let parsed = Message::from_vec(query);
    if query.len() < 12 {
        prop_assert!(
            matches!(reply, Reply::Drop),
            "a message shorter than a header was not dropped"
        );
        return Ok(None);
    }
    let answer = match reply {
        Reply::Drop => {
            // Only what is not a query (a response) is dropped once a header is there.
            if let Ok(m) = &parsed {
                prop_assert_eq!(
                    m.metadata.message_type,
                    MessageType::Response,
                    "a parseable query was dropped"
                );
            }
            return Ok(None);
        }
        Reply::Forward => {
            let m = match &parsed {
                Ok(m) => m,
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "a message that does not parse ({e}) was forwarded"
                    )));
                }
            };
            prop_assert_eq!(m.metadata.message_type, MessageType::Query);
            prop_assert_eq!(m.metadata.op_code, OpCode::Query);
            prop_assert_eq!(
                m.queries.len(),
                1,
                "forwarded with {} questions",
                m.queries.len()
            );
            let name = m.queries[0].name().to_ascii();
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            prop_assert!(!is_in_zone(&name), "zone name {} forwarded", name);
            return Ok(None);
        }
        Reply::Answer(a) => a,
    };
    let msg = match Message::from_vec(&answer) {
        Ok(m) => m,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "the answer does not parse ({e}): {answer:02x?}"
            )));
        }
    };
    prop_assert_eq!(&answer[..2], &query[..2], "the answer has another id");
    prop_assert_eq!(msg.metadata.message_type, MessageType::Response);
    let limit = parsed.as_ref().map_or(512, Message::max_payload);
    if udp {
        prop_assert!(
            answer.len() <= usize::from(limit),
            "a {}-byte UDP answer, the client takes {}",
            answer.len(),
            limit
        );
    }
    match &parsed {
        Err(e) => {
            prop_assert!(
                matches!(
                    msg.metadata.response_code,
                    ResponseCode::FormErr | ResponseCode::ServFail
                ),
                "a message that does not parse ({}) got {:?}, not FORMERR or SERVFAIL",
                e,
                msg.metadata.response_code
            );
        }
        Ok(q) => {
            prop_assert_eq!(
                q.metadata.message_type,
                MessageType::Query,
                "a response was answered"
            );
            // An answer to an EDNS query carries an OPT record, of version 0.
            prop_assert_eq!(
                msg.edns.is_some(),
                q.edns.is_some(),
                "OPT record iff the query had one"
            );
            prop_assert!(msg.edns.as_ref().is_none_or(|e| e.version() == 0));
            let transfer_or_class = |asked: &hickory_proto::op::Query| {
                !matches!(asked.query_class, DNSClass::IN | DNSClass::ANY)
                    || matches!(asked.query_type(), RecordType::AXFR | RecordType::IXFR)
            };
            if q.edns.as_ref().is_some_and(|e| e.version() > 0) {
                // BADVERS (16; hickory reads it back under its TSIG name).
                prop_assert_eq!(u16::from(msg.metadata.response_code), 16);
            } else if q.metadata.op_code != OpCode::Query {
                prop_assert_eq!(msg.metadata.response_code, ResponseCode::NotImp);
            } else if q.queries.len() != 1 {
                prop_assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
            } else if transfer_or_class(&q.queries[0]) {
                prop_assert_eq!(msg.metadata.response_code, ResponseCode::Refused);
                prop_assert_eq!(&msg.queries, &q.queries, "the question is not echoed");
            } else {
                let asked = &q.queries[0];
                let name = asked.name().to_ascii();
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                prop_assert!(is_in_zone(&name), "{} is not ours but was answered", name);
                prop_assert!(msg.metadata.authoritative);
                prop_assert!(
                    matches!(
                        msg.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ),
                    "{:?} for {}",
                    msg.metadata.response_code,
                    name
                );
                prop_assert_eq!(msg.metadata.recursion_desired, q.metadata.recursion_desired);
                prop_assert_eq!(&msg.queries, &q.queries, "the question is not echoed");
                if msg.metadata.response_code == ResponseCode::NXDomain {
                    prop_assert!(msg.answers.is_empty());
                }
                if !msg.metadata.truncation {
                    for rr in &msg.answers {
                        prop_assert_eq!(&rr.name, asked.name(), "an answer for another name");
                        let t = asked.query_type();
                        prop_assert!(
                            t == RecordType::ANY || rr.record_type() == t,
                            "a {} answer to a {} question",
                            rr.record_type(),
                            t
                        );
                    }
                }
            }
        }
    }
    Ok(Some(msg))
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary bytes, over UDP and TCP: never a panic; every reply as it must be.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        udp in any::<bool>(),
    ) {
        let zone = sample_zone();
        check_reply(&bytes, udp, &zone)?;
    }

    /// A header that says one question, followed by arbitrary bytes: gets past the cheapest
    /// checks into both the lean and the general path.
    #[test]
    fn one_question_header_and_garbage(
        id in any::<u16>(),
        rd in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..300),
        udp in any::<bool>(),
    ) {
        let zone = sample_zone();
        let mut bytes = id.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[u8::from(rd), 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&tail);
        check_reply(&bytes, udp, &zone)?;
    }

    /// Well-formed queries (zone names and others, any type, with or without EDNS): every
    /// reply as it must be; a zone name is answered, another is forwarded.
    #[test]
    fn valid_queries_are_answered_or_forwarded(q in query(), udp in any::<bool>()) {
        let zone = sample_zone();
        check_reply(&q.encode(), udp, &zone)?;
    }

    /// Valid queries mutated once to four times: never a panic; malformed ones get no
    /// answer or FORMERR/SERVFAIL.
    #[test]
    fn mutated_queries_never_panic(
        q in query(),
        mutations in prop::collection::vec(mutation(), 1..5),
        udp in any::<bool>(),
    ) {
        let zone = sample_zone();
        let mut bytes = q.encode();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        check_reply(&bytes, udp, &zone)?;
    }
}

/// Service sets as the controllers could send them, names and addresses unchecked (a
/// backslash in a name once broke the prepared answers: see
/// `zone_names_with_a_backslash_get_a_parseable_answer`).
fn services() -> impl Strategy<Value = Vec<pb::ServiceInfo>> {
    let text = prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        1 => ".{0,20}",
        1 => "[a-zA-Z0-9._-]{0,70}",
    ];
    let endpoint = (
        text.clone(),
        prop_oneof!["10\\.42\\.[0-9]{1,3}\\.[0-9]{1,3}", ".{0,16}",],
        any::<bool>(),
    )
        .prop_map(|(allocation, ip, ready)| endpoint(&allocation, &ip, ready));
    let port = (text.clone(), any::<u32>(), any::<i32>()).prop_map(|(name, port, protocol)| {
        pb::ServicePort {
            name,
            port,
            protocol,
        }
    });
    prop::collection::vec(
        (
            text.clone(),
            text,
            prop::collection::vec(port, 0..3),
            prop::collection::vec(endpoint, 0..4),
            prop_oneof![
                "10\\.43\\.[0-9]{1,3}\\.[0-9]{1,3}",
                ".{0,16}",
                Just(String::new()),
            ],
        )
            .prop_map(|(name, namespace, ports, endpoints, vip)| pb::ServiceInfo {
                name,
                namespace,
                ports,
                endpoints,
                vip,
                ..Default::default()
            }),
        0..4,
    )
}

proptest! {
    #![proptest_config(config(128))]

    /// Any service set gives a VIP table whose every line is one of the rules the node
    /// writes: names and addresses from the wire cannot add a line or a rule of their own.
    #[test]
    fn any_service_set_gives_a_well_formed_vip_table(services in services()) {
        let vips = skiff_agent::contract::vip_services(&services);
        for v in &vips {
            let s = services.iter().find(|s| format!("{}/{}", s.namespace, s.name) == v.name);
            prop_assert!(s.is_some_and(|s| s.vip == v.vip.to_string()));
            prop_assert!(v.ports.iter().all(|(p, _)| *p > 0));
        }
        let table = skiff_agent::net::vip::render(&vips, "10.42.1.0/24", "skiff0");
        let mut section = "";
        for line in table.lines() {
            match line {
                "*nat" | "*filter" => section = line,
                "COMMIT" => {}
                l if l.starts_with(':') => {}
                l => {
                    prop_assert!(l.starts_with("-A "), "{l}");
                    prop_assert_eq!(l.matches('"').count() % 2, 0, "{}", l);
                    let chain = l.split(' ').nth(1).unwrap_or_default();
                    let allowed: &[&str] = if section == "*nat" {
                        &["SKIFF-SERVICES", "SKIFF-SVC-HAIRPIN"]
                    } else {
                        &["SKIFF-SVC-REJECT"]
                    };
                    prop_assert!(allowed.contains(&chain), "{l}");
                }
            }
        }
        let services_with_vip = vips.len();
        prop_assert_eq!(table.matches("-j REJECT --reject-with tcp-reset").count(), services_with_vip);
    }

    /// Any service set builds a zone without a panic, and queries for every name it could
    /// hold (in any spelling the lean path accepts) are answered as they must be.
    #[test]
    fn any_service_set_builds_a_zone_that_answers(
        services in services(),
        rd in any::<bool>(),
        udp in any::<bool>(),
    ) {
        let zone = Zone::build(&services);
        let mut names = Vec::new();
        for s in &services {
            let base = format!("{}.{}.{}", s.name, s.namespace, dns::ZONE);
            for e in &s.endpoints {
                names.push(format!("{}.{base}", e.allocation));
            }
            for p in &s.ports {
                names.push(format!("_{}._tcp.{base}", p.name));
                names.push(format!("_{}._udp.{base}", p.name));
            }
            names.push(base);
        }
        for name in names {
            for t in [1u16, 28, 33, 255] {
                let q = Query {
                    id: 7,
                    flags: u8::from(rd),
                    flags2: 0,
                    questions: vec![Question {
                        labels: name_labels(&name),
                        qtype: t,
                        qclass: 1,
                    }],
                    edns: None,
                };
                check_reply(&q.encode(), udp, &zone)?;
            }
        }
    }
}

/// A question name longer than 255 octets under the zone is a malformed message (hickory
/// refuses it): it must get FORMERR (or no answer), not an NXDOMAIN echoing the over-long
/// question, which no parser accepts and which, over UDP, can exceed 512 bytes. Found by
/// `valid_queries_are_answered_or_forwarded` and `mutated_queries_never_panic`.
#[test]
fn overlong_zone_names_get_formerr() {
    let zone = sample_zone();
    let mut labels = vec![vec![b'x'; 63]; 5];
    labels.extend(name_labels("web.default.skiff.internal"));
    let q = Query {
        id: 0,
        flags: 0,
        flags2: 0,
        questions: vec![Question {
            labels,
            qtype: 1,
            qclass: 1,
        }],
        edns: None,
    };
    let bytes = q.encode();
    assert!(Message::from_vec(&bytes).is_err(), "the query is malformed");
    for udp in [true, false] {
        match dns::answer(&bytes, &zone, udp) {
            Reply::Drop => {}
            Reply::Forward => panic!("forwarded"),
            Reply::Answer(a) => {
                let m = Message::from_vec(&a).expect("the answer parses");
                assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
                assert!(!udp || a.len() <= 512, "{} bytes over UDP", a.len());
            }
        }
    }
}

/// The prepared answers of a zone built from a name with a backslash (service `\\` in
/// namespace `a`) are built for another question length than the one a client sends: the
/// answer's compression pointers land mid-label and it does not parse. Found by
/// `any_service_set_builds_a_zone_that_answers`.
#[test]
fn zone_names_with_a_backslash_get_a_parseable_answer() {
    let zone = Zone::build(&[pb::ServiceInfo {
        name: "\\".into(),
        namespace: "a".into(),
        ..Default::default()
    }]);
    let q = Query {
        id: 7,
        flags: 0,
        flags2: 0,
        questions: vec![Question {
            labels: name_labels("\\.a.skiff.internal"),
            qtype: 1,
            qclass: 1,
        }],
        edns: None,
    };
    match dns::answer(&q.encode(), &zone, true) {
        Reply::Answer(a) => {
            let m = Message::from_vec(&a);
            assert!(m.is_ok(), "the answer does not parse: {a:02x?}");
        }
        Reply::Drop | Reply::Forward => panic!("not answered"),
    }
}
