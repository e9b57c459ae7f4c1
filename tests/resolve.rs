//! RFC 3263 resolution against a real DNS server on loopback: the proxy's resolver asks
//! a small authoritative responder in this process (hickory-proto's wire format, records
//! from a table, every query counted), bound to 127.0.0.1:0 so no port is guessed.

use controlplane::proxy::resolve::{ResolveError, Resolver, ResolverConfig};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NAPTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use sip::Peer;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// TTL of the table's records, long enough to outlive a test.
const TTL: u32 = 300;

/// A UDP DNS server answering from a table, authoritative for everything it is asked.
struct DnsServer {
    addr: SocketAddr,
    queries: Arc<Mutex<HashMap<(String, RecordType), usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start(records: Vec<Record>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Short, so the thread notices `stop` soon after the test ends.
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (queries, stop) = (queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                    let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                    let reply = answer(&records, &queries, &request);
                    let _ = socket.send_to(&reply.to_vec().unwrap(), from);
                }
            })
        };
        Self { addr, queries, stop, thread: Some(thread) }
    }

    /// How often `name` (without the final dot) was asked for `rtype`.
    fn count(&self, name: &str, rtype: RecordType) -> usize {
        self.queries.lock().unwrap().get(&(name.to_string(), rtype)).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.queries.lock().unwrap().values().sum()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The table's records of the question; none: NODATA if the name has other records,
/// else NXDOMAIN, either with an SOA so the resolver may cache the negative answer
/// (RFC 2308).
fn answer(records: &[Record], queries: &Mutex<HashMap<(String, RecordType), usize>>, request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let Some(query) = request.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    reply.add_query(query.clone());
    let asked = query.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    *queries.lock().unwrap().entry((asked, query.query_type())).or_default() += 1;
    let same_name: Vec<&Record> = records.iter().filter(|r| r.name == *query.name()).collect();
    let found: Vec<Record> =
        same_name.iter().filter(|r| r.record_type() == query.query_type()).map(|r| (*r).clone()).collect();
    if found.is_empty() {
        if same_name.is_empty() {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        let soa = SOA::new(name("ns.test"), name("hostmaster.test"), 1, 3600, 600, 86400, TTL);
        reply.add_authority(Record::from_rdata(name("test"), TTL, RData::SOA(soa)));
    }
    reply.add_answers(found);
    reply
}

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{s}.")).unwrap()
}

fn naptr(owner: &str, order: u16, preference: u16, service: &str, replacement: &str) -> Record {
    let rdata =
        NAPTR::new(order, preference, b"s".to_vec().into(), service.as_bytes().into(), Box::new([]), name(replacement));
    Record::from_rdata(name(owner), TTL, RData::NAPTR(rdata))
}

fn srv(owner: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    Record::from_rdata(name(owner), TTL, RData::SRV(SRV::new(priority, weight, port, name(target))))
}

fn a(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().unwrap())))
}

fn aaaa(owner: &str, ip: &str) -> Record {
    Record::from_rdata(name(owner), TTL, RData::AAAA(AAAA(ip.parse().unwrap())))
}

/// A zone with all three steps: NAPTR preferring TCP, SRV for TCP and UDP, and
/// addresses; plus a host with addresses only and one with a 1 s TTL.
fn zone() -> Vec<Record> {
    vec![
        naptr("example.test", 10, 10, "SIP+D2T", "_sip._tcp.example.test"),
        naptr("example.test", 10, 20, "SIP+D2U", "_sip._udp.example.test"),
        naptr("example.test", 10, 5, "SIPS+D2T", "_sips._tcp.example.test"),
        srv("_sip._tcp.example.test", 10, 0, 5070, "b.example.test"),
        srv("_sip._tcp.example.test", 5, 0, 5071, "a.example.test"),
        srv("_sip._udp.example.test", 10, 0, 5060, "a.example.test"),
        srv("_sips._tcp.example.test", 10, 0, 5061, "a.example.test"),
        a("a.example.test", TTL, "127.0.0.10"),
        aaaa("a.example.test", "2001:db8::10"),
        a("b.example.test", TTL, "127.0.0.11"),
        a("plain.test", TTL, "127.0.0.12"),
        a("short.test", 1, "127.0.0.13"),
    ]
}

fn resolver(nameservers: Vec<SocketAddr>, timeout_ms: u64) -> Resolver {
    Resolver::new(&ResolverConfig { nameservers, timeout_ms, ..ResolverConfig::default() }).unwrap()
}

fn peer(transport: &str, addr: &str) -> Peer {
    let addr = addr.parse().unwrap();
    if transport == "tcp" {
        Peer::tcp(addr)
    } else {
        Peer::udp(addr)
    }
}

#[tokio::test]
async fn naptr_srv_and_addresses_give_ordered_peers() {
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![dns.addr], 2000);
    let peers = resolver.resolve("sip:alice@example.test").await.unwrap();
    // TCP by NAPTR preference, its SRV targets by priority (a before b), then UDP; TLS
    // skipped; each host's IPv4 address before its IPv6 one.
    assert_eq!(
        peers,
        vec![
            peer("tcp", "127.0.0.10:5071"),
            peer("tcp", "[2001:db8::10]:5071"),
            peer("tcp", "127.0.0.11:5070"),
            peer("udp", "127.0.0.10:5060"),
            peer("udp", "[2001:db8::10]:5060"),
        ]
    );
    assert_eq!(dns.count("example.test", RecordType::NAPTR), 1);
    assert_eq!(dns.count("_sip._tcp.example.test", RecordType::SRV), 1);
    assert_eq!(dns.count("_sip._udp.example.test", RecordType::SRV), 1);
    assert_eq!(dns.count("_sips._tcp.example.test", RecordType::SRV), 0);
    assert_eq!(dns.count("a.example.test", RecordType::A), 1);
    assert_eq!(dns.count("b.example.test", RecordType::AAAA), 1);
}

#[tokio::test]
async fn a_second_resolve_is_answered_from_the_cache() {
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![dns.addr], 2000);
    let first = resolver.resolve("sip:example.test").await.unwrap();
    let asked = dns.total();
    assert!(asked >= 6, "NAPTR, two SRV, A and AAAA of two hosts: {asked}");
    // Including negative answers (b.example.test has no AAAA): their SOA gives a TTL.
    assert_eq!(resolver.resolve("sip:bob@example.test").await.unwrap(), first);
    assert_eq!(dns.total(), asked, "the second resolve sent queries");
}

#[tokio::test]
async fn an_expired_record_is_asked_again() {
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![dns.addr], 2000);
    let want = vec![peer("udp", "127.0.0.13:5080")];
    assert_eq!(resolver.resolve("sip:short.test:5080").await.unwrap(), want);
    assert_eq!(resolver.resolve("sip:short.test:5080").await.unwrap(), want);
    assert_eq!(dns.count("short.test", RecordType::A), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(resolver.resolve("sip:short.test:5080").await.unwrap(), want);
    assert_eq!(dns.count("short.test", RecordType::A), 2);
}

#[tokio::test]
async fn without_naptr_and_srv_the_host_is_used_at_5060_over_udp() {
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![dns.addr], 2000);
    assert_eq!(resolver.resolve("sip:plain.test").await.unwrap(), vec![peer("udp", "127.0.0.12:5060")]);
    assert_eq!(dns.count("_sip._udp.plain.test", RecordType::SRV), 1);
    assert_eq!(dns.count("_sip._tcp.plain.test", RecordType::SRV), 1);
    assert_eq!(resolver.resolve("sip:nowhere.test").await, Err(ResolveError::NotFound));
}

#[tokio::test]
async fn transport_parameter_and_explicit_port() {
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![dns.addr], 2000);
    let peers = resolver.resolve("<sip:example.test;transport=udp;lr>").await.unwrap();
    assert_eq!(peers, vec![peer("udp", "127.0.0.10:5060"), peer("udp", "[2001:db8::10]:5060")]);
    assert_eq!(dns.count("example.test", RecordType::NAPTR), 0);
    let peers = resolver.resolve("sip:b.example.test:5099;transport=tcp").await.unwrap();
    assert_eq!(peers, vec![peer("tcp", "127.0.0.11:5099")]);
    assert_eq!(resolver.resolve("sip:127.0.0.1:5062").await.unwrap(), vec![peer("udp", "127.0.0.1:5062")]);
}

#[tokio::test]
async fn a_nameserver_that_never_answers_fails_the_lookup() {
    // Bound and never read: queries vanish, no ICMP error comes back.
    let black_hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = resolver(vec![black_hole.local_addr().unwrap()], 500);
    // The outer bound only keeps a broken resolver from hanging the test run.
    let result = tokio::time::timeout(Duration::from_secs(20), resolver.resolve("sip:example.test"))
        .await
        .expect("resolve hung");
    assert_eq!(result, Err(ResolveError::Timeout));
}

#[tokio::test]
async fn a_dead_nameserver_next_to_a_live_one_does_not_fail_the_lookup() {
    let black_hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = DnsServer::start(zone());
    let resolver = resolver(vec![black_hole.local_addr().unwrap(), dns.addr], 2000);
    let peers = resolver.resolve("sip:plain.test").await.unwrap();
    assert_eq!(peers, vec![peer("udp", "127.0.0.12:5060")]);
}
