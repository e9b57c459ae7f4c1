//! The worker over real loopback sockets, in both receive modes.

use dataplane::relay::SessionSpec;
use dataplane::{Command, Dataplane, DataplaneConfig, Event, IoMode, LatchPolicy, NewSession};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

fn bind() -> (Socket, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_nonblocking(true).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let a = s.local_addr().unwrap().as_socket().unwrap();
    (s, a)
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 172];
    p[0] = 0x80;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[8..12].copy_from_slice(&[1, 2, 3, 4]);
    p[12..14].copy_from_slice(&seq.to_be_bytes());
    p
}

fn relay_both_ways(mode: IoMode) {
    let cfg = DataplaneConfig { workers: 1, io_mode: mode, ..DataplaneConfig::default() };
    let (dp, events) = Dataplane::start(cfg).unwrap();
    assert_eq!(dp.workers()[0].mode(), mode);
    let (a_rtp, a_rtp_addr) = bind();
    let (a_rtcp, _) = bind();
    let (b_rtp, b_rtp_addr) = bind();
    let (b_rtcp, _) = bind();
    let spec = SessionSpec {
        id: 7,
        remotes: [None, None],
        clock_rates: [None, None],
        policy: LatchPolicy::default(),
        inactivity: Duration::from_secs(60),
    };
    dp.workers()[0]
        .send(Command::Add(Box::new(NewSession { spec, sockets: [[a_rtp, a_rtcp], [b_rtp, b_rtcp]] })))
        .unwrap();
    let alice = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bob = UdpSocket::bind("127.0.0.1:0").unwrap();
    alice.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    bob.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Bob speaks first so that his address is latched; then Alice's packets reach him.
    bob.send_to(&rtp(0), b_rtp_addr).unwrap();
    let mut buf = [0u8; 2048];
    // Bob's first packet is dropped (Alice unknown); wait for the latch event.
    loop {
        match events.recv_timeout(Duration::from_secs(2)).expect("latch event") {
            Event::Latched { id: 7, leg: 1, .. } => break,
            _ => continue,
        }
    }
    for seq in 1..=100u16 {
        alice.send_to(&rtp(seq), a_rtp_addr).unwrap();
        let (n, from) = bob.recv_from(&mut buf).unwrap();
        assert_eq!(from, b_rtp_addr);
        assert_eq!(&buf[..n], &rtp(seq)[..]);
        bob.send_to(&rtp(seq), b_rtp_addr).unwrap();
        let (n, from) = alice.recv_from(&mut buf).unwrap();
        assert_eq!(from, a_rtp_addr);
        assert_eq!(&buf[..n], &rtp(seq)[..]);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    dp.workers()[0].send(Command::Query { id: 7, reply: tx }).unwrap();
    let snap = rx.recv_timeout(Duration::from_secs(2)).unwrap().unwrap();
    assert_eq!(snap.legs[0].rtp.forwarded, 100);
    assert_eq!(snap.legs[1].rtp.forwarded, 100);
    assert_eq!(snap.legs[0].rtp.lost, 0);
    dp.workers()[0].send(Command::Remove { id: 7 }).unwrap();
    loop {
        if let Event::Released { id: 7 } = events.recv_timeout(Duration::from_secs(2)).expect("released") {
            break;
        }
    }
    // The port is free again.
    UdpSocket::bind(a_rtp_addr).expect("port released");
}

#[test]
fn multishot_relays_both_ways() {
    relay_both_ways(IoMode::Multishot);
}

#[test]
fn oneshot_relays_both_ways() {
    relay_both_ways(IoMode::Oneshot);
}
