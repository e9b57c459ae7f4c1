//! SIP transactions (RFC 3261 §17), sans IO: they take messages and the time, and
//! return what to transmit and what to tell the transaction user. Timers live in a
//! fixed table indexed by [`Timer`]; the driver asks [`Transaction::next_timeout`] and
//! calls [`Transaction::on_timeout`] when it passes.

use crate::message::{Message, StartLine};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// RTT estimate.
pub const T1: Duration = Duration::from_millis(500);
/// Longest retransmit interval for non-INVITE requests and INVITE responses.
pub const T2: Duration = Duration::from_secs(4);
/// Longest time a message stays in the network.
pub const T4: Duration = Duration::from_secs(5);

/// The timers of RFC 3261 §17 (C belongs to the proxy core, not the transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Timer {
    /// INVITE client: retransmit.
    A,
    /// INVITE client: give up.
    B,
    /// INVITE client: wait for response retransmissions after a final non-2xx.
    D,
    /// Non-INVITE client: retransmit.
    E,
    /// Non-INVITE client: give up.
    F,
    /// Non-INVITE client: wait for response retransmissions.
    K,
    /// INVITE server: retransmit the final response.
    G,
    /// INVITE server: give up waiting for ACK.
    H,
    /// INVITE server: absorb ACK retransmissions.
    I,
    /// Non-INVITE server: absorb request retransmissions.
    J,
}

const TIMERS: usize = 10;

/// Which of the four machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Client, INVITE.
    ClientInvite,
    /// Client, other methods.
    ClientNonInvite,
    /// Server, INVITE.
    ServerInvite,
    /// Server, other methods.
    ServerNonInvite,
}

/// States of RFC 3261 §17.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// INVITE client, request sent.
    Calling,
    /// Non-INVITE, request sent or received.
    Trying,
    /// Provisional response seen.
    Proceeding,
    /// Final response seen or sent.
    Completed,
    /// INVITE server: ACK received.
    Confirmed,
    /// Done; the transaction can be dropped.
    Terminated,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the transaction's peer.
    Transmit(Vec<u8>),
    /// Client: a response for the transaction user.
    Response(Message),
    /// The transaction timed out (client: no final response; server: no ACK).
    Timeout,
    /// The transaction is over.
    Terminated,
}

/// One transaction.
#[derive(Debug)]
pub struct Transaction {
    kind: Kind,
    state: State,
    reliable: bool,
    request: Message,
    /// Bytes of the request (client) or of the last response sent (server).
    last: Vec<u8>,
    ack: Option<Vec<u8>>,
    timers: [Option<Instant>; TIMERS],
    interval: Duration,
    out: VecDeque<Output>,
}

impl Transaction {
    /// A client transaction for `request`, which it transmits at once.
    pub fn client(request: Message, reliable: bool, now: Instant) -> Self {
        let invite = request.method() == "INVITE";
        let mut t = Self {
            kind: if invite { Kind::ClientInvite } else { Kind::ClientNonInvite },
            state: if invite { State::Calling } else { State::Trying },
            reliable,
            last: request.to_bytes(),
            request,
            ack: None,
            timers: [None; TIMERS],
            interval: T1,
            out: VecDeque::new(),
        };
        t.out.push_back(Output::Transmit(t.last.clone()));
        if !reliable {
            t.set(if invite { Timer::A } else { Timer::E }, now + T1);
        }
        t.set(if invite { Timer::B } else { Timer::F }, now + 64 * T1);
        t
    }

    /// A server transaction for a received `request`.
    pub fn server(request: Message, reliable: bool) -> Self {
        let invite = request.method() == "INVITE";
        Self {
            kind: if invite { Kind::ServerInvite } else { Kind::ServerNonInvite },
            state: if invite { State::Proceeding } else { State::Trying },
            reliable,
            last: Vec::new(),
            request,
            ack: None,
            timers: [None; TIMERS],
            interval: T1,
            out: VecDeque::new(),
        }
    }

    /// Which machine.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The request it is about.
    pub fn request(&self) -> &Message {
        &self.request
    }

    fn set(&mut self, t: Timer, at: Instant) {
        self.timers[t as usize] = Some(at);
    }

    fn clear(&mut self, t: Timer) {
        self.timers[t as usize] = None;
    }

    fn terminate(&mut self) {
        self.state = State::Terminated;
        self.timers = [None; TIMERS];
        self.out.push_back(Output::Terminated);
    }

    /// The earliest pending timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }

    /// The next thing to do, until `None`.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Client: a response arrived.
    pub fn on_response(&mut self, resp: Message, now: Instant) {
        let Some(code) = resp.code() else { return };
        match (self.kind, self.state) {
            (Kind::ClientInvite, State::Calling | State::Proceeding) => {
                if code < 200 {
                    self.state = State::Proceeding;
                    self.clear(Timer::A);
                    self.clear(Timer::B);
                    self.out.push_back(Output::Response(resp));
                } else if code < 300 {
                    // 2xx: the TU acknowledges end to end.
                    self.out.push_back(Output::Response(resp));
                    self.terminate();
                } else {
                    let ack = self.ack_for(&resp).to_bytes();
                    self.out.push_back(Output::Transmit(ack.clone()));
                    self.ack = Some(ack);
                    self.out.push_back(Output::Response(resp));
                    self.state = State::Completed;
                    self.clear(Timer::A);
                    self.clear(Timer::B);
                    self.set(Timer::D, now + if self.reliable { Duration::ZERO } else { Duration::from_secs(32) });
                }
            }
            (Kind::ClientInvite, State::Completed) if code >= 300 => {
                // A retransmitted final response: our ACK was lost.
                if let Some(a) = &self.ack {
                    self.out.push_back(Output::Transmit(a.clone()));
                }
            }
            (Kind::ClientNonInvite, State::Trying | State::Proceeding) => {
                self.out.push_back(Output::Response(resp));
                if code < 200 {
                    self.state = State::Proceeding;
                } else {
                    self.state = State::Completed;
                    self.clear(Timer::E);
                    self.clear(Timer::F);
                    self.set(Timer::K, now + if self.reliable { Duration::ZERO } else { T4 });
                }
            }
            _ => {}
        }
    }

    /// Server: the request was received again (a retransmission), or an ACK for it.
    pub fn on_request(&mut self, req: &Message, now: Instant) {
        let ack = matches!(&req.start, StartLine::Request { method, .. } if method == "ACK");
        match (self.kind, self.state, ack) {
            (Kind::ServerInvite, State::Completed, true) => {
                self.state = State::Confirmed;
                self.clear(Timer::G);
                self.clear(Timer::H);
                self.set(Timer::I, now + if self.reliable { Duration::ZERO } else { T4 });
            }
            (_, State::Proceeding | State::Completed, false) if !self.last.is_empty() => {
                self.out.push_back(Output::Transmit(self.last.clone()));
            }
            _ => {}
        }
    }

    /// Server: the transaction user responds.
    pub fn respond(&mut self, resp: &Message, now: Instant) {
        let Some(code) = resp.code() else { return };
        if matches!(self.state, State::Completed | State::Confirmed | State::Terminated) {
            return;
        }
        self.last = resp.to_bytes();
        self.out.push_back(Output::Transmit(self.last.clone()));
        match self.kind {
            Kind::ServerInvite if code < 200 => {}
            Kind::ServerInvite if code < 300 => self.terminate(),
            Kind::ServerInvite => {
                self.state = State::Completed;
                if !self.reliable {
                    self.interval = T1;
                    self.set(Timer::G, now + T1);
                }
                self.set(Timer::H, now + 64 * T1);
            }
            _ if code < 200 => self.state = State::Proceeding,
            _ => {
                self.state = State::Completed;
                self.set(Timer::J, now + if self.reliable { Duration::ZERO } else { 64 * T1 });
            }
        }
    }

    /// Fires every timer due at `now`.
    pub fn on_timeout(&mut self, now: Instant) {
        for i in 0..TIMERS {
            let Some(at) = self.timers[i] else { continue };
            if at > now {
                continue;
            }
            self.timers[i] = None;
            match i {
                x if x == Timer::A as usize && self.state == State::Calling => {
                    self.out.push_back(Output::Transmit(self.last.clone()));
                    self.interval *= 2;
                    self.set(Timer::A, now + self.interval);
                }
                x if x == Timer::E as usize && matches!(self.state, State::Trying | State::Proceeding) => {
                    self.out.push_back(Output::Transmit(self.last.clone()));
                    self.interval = if self.state == State::Trying { (self.interval * 2).min(T2) } else { T2 };
                    self.set(Timer::E, now + self.interval);
                }
                x if x == Timer::G as usize && self.state == State::Completed => {
                    self.out.push_back(Output::Transmit(self.last.clone()));
                    self.interval = (self.interval * 2).min(T2);
                    self.set(Timer::G, now + self.interval);
                }
                x if (x == Timer::B as usize || x == Timer::F as usize || x == Timer::H as usize)
                    && self.state != State::Terminated =>
                {
                    self.out.push_back(Output::Timeout);
                    self.terminate();
                }
                x if (x == Timer::D as usize
                    || x == Timer::K as usize
                    || x == Timer::I as usize
                    || x == Timer::J as usize)
                    && self.state != State::Terminated =>
                {
                    self.terminate();
                }
                _ => {}
            }
        }
    }

    /// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): same Request-URI,
    /// Call-ID, From, CSeq number and top Via as the INVITE, To from the response,
    /// the INVITE's Route headers.
    fn ack_for(&self, resp: &Message) -> Message {
        let uri = match &self.request.start {
            StartLine::Request { uri, .. } => uri.clone(),
            StartLine::Response { .. } => String::new(),
        };
        let mut headers = Vec::new();
        if let Some(v) = self.request.header_values("Via").next() {
            headers.push(("Via".to_string(), v.to_string()));
        }
        for h in ["From", "Call-ID"] {
            if let Some(v) = self.request.header(h) {
                headers.push((h.to_string(), v.to_string()));
            }
        }
        if let Some(v) = resp.header("To") {
            headers.push(("To".to_string(), v.to_string()));
        }
        let n = self.request.cseq().map(|c| c.0).unwrap_or(1);
        headers.push(("CSeq".to_string(), format!("{n} ACK")));
        for r in self.request.header_values("Route") {
            headers.push(("Route".to_string(), r.to_string()));
        }
        headers.push(("Max-Forwards".to_string(), "70".to_string()));
        Message { start: StartLine::Request { method: "ACK".into(), uri }, headers, body: Vec::new() }
    }
}

/// The key that matches responses to client transactions (RFC 3261 §17.1.3): top Via
/// branch and CSeq method.
pub fn client_key(m: &Message) -> Option<(String, String)> {
    Some((m.via()?.branch?, m.cseq()?.1))
}

/// The key that matches requests to server transactions (§17.2.3): branch, sent-by and
/// method, with ACK matching its INVITE.
pub fn server_key(m: &Message) -> Option<(String, String, String)> {
    let v = m.via()?;
    let method = match m.method() {
        "ACK" => "INVITE".to_string(),
        other => other.to_string(),
    };
    Some((v.branch?, format!("{}:{}", v.host, v.port.unwrap_or(5060)), method))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str) -> Message {
        let t = format!(
            "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\nFrom: <sip:a@example.com>;tag=f\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 1 {method}\r\nRoute: <sip:p1;lr>\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(t.as_bytes(), false).unwrap().0
    }

    fn drain(t: &mut Transaction) -> Vec<Output> {
        std::iter::from_fn(|| t.poll_output()).collect()
    }

    fn transmits(o: &[Output]) -> usize {
        o.iter().filter(|x| matches!(x, Output::Transmit(_))).count()
    }

    #[test]
    fn invite_client_retransmits_doubling_then_times_out_at_b() {
        let t0 = Instant::now();
        let mut t = Transaction::client(req("INVITE"), false, t0);
        assert_eq!(transmits(&drain(&mut t)), 1);
        // A fires at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s: six retransmissions before B at 32 s.
        let mut now = t0;
        let mut sent = 0;
        while let Some(at) = t.next_timeout() {
            now = at;
            t.on_timeout(now);
            let o = drain(&mut t);
            sent += transmits(&o);
            if o.contains(&Output::Timeout) {
                break;
            }
        }
        assert_eq!(sent, 6);
        assert_eq!(now - t0, 64 * T1);
        assert_eq!(t.state(), State::Terminated);
    }

    #[test]
    fn invite_client_acks_a_failure_and_absorbs_its_retransmission() {
        let t0 = Instant::now();
        let mut t = Transaction::client(req("INVITE"), false, t0);
        drain(&mut t);
        let r = req("INVITE").response(100, "Trying", None);
        t.on_response(r, t0);
        assert_eq!(t.state(), State::Proceeding);
        t.on_timeout(t0 + Duration::from_secs(10));
        assert_eq!(transmits(&drain(&mut t)), 1 - 1, "no retransmission once proceeding");
        let busy = req("INVITE").response(486, "Busy Here", Some("tt"));
        t.on_response(busy.clone(), t0);
        let o = drain(&mut t);
        let Output::Transmit(ack) = &o[0] else { panic!("{o:?}") };
        let ack = Message::parse(ack, false).unwrap().0;
        assert_eq!(ack.method(), "ACK");
        assert_eq!(ack.to_tag(), Some("tt"));
        assert_eq!(ack.cseq(), Some((1, "ACK".into())));
        assert_eq!(ack.header("Route"), Some("<sip:p1;lr>"));
        assert!(matches!(o[1], Output::Response(_)));
        t.on_response(busy, t0 + Duration::from_secs(1));
        assert_eq!(transmits(&drain(&mut t)), 1, "ACK again");
        t.on_timeout(t0 + Duration::from_secs(33));
        assert_eq!(t.state(), State::Terminated);
    }

    #[test]
    fn non_invite_client_caps_retransmissions_at_t2() {
        let t0 = Instant::now();
        let mut t = Transaction::client(req("OPTIONS"), false, t0);
        drain(&mut t);
        let mut gaps = Vec::new();
        let mut last = t0;
        while let Some(at) = t.next_timeout() {
            t.on_timeout(at);
            let o = drain(&mut t);
            if transmits(&o) > 0 {
                gaps.push(at - last);
                last = at;
            }
            if o.contains(&Output::Timeout) {
                break;
            }
        }
        assert_eq!(&gaps[..4], &[T1, 2 * T1, 4 * T1, T2]);
        assert!(gaps.iter().all(|g| *g <= T2));
        // Over TCP nothing is retransmitted and K is zero.
        let mut t = Transaction::client(req("OPTIONS"), true, t0);
        drain(&mut t);
        t.on_response(req("OPTIONS").response(200, "OK", Some("x")), t0);
        t.on_timeout(t0);
        assert_eq!(t.state(), State::Terminated);
    }

    #[test]
    fn invite_server_retransmits_final_until_ack() {
        let t0 = Instant::now();
        let inv = req("INVITE");
        let mut t = Transaction::server(inv.clone(), false);
        t.respond(&inv.response(100, "Trying", None), t0);
        t.on_request(&inv, t0);
        assert_eq!(transmits(&drain(&mut t)), 2, "the retransmitted INVITE gets the 100 again");
        t.respond(&inv.response(404, "Not Found", Some("s")), t0);
        drain(&mut t);
        t.on_timeout(t0 + T1);
        assert_eq!(transmits(&drain(&mut t)), 1, "G");
        let mut ack = req("ACK");
        ack.set("CSeq", "1 ACK");
        t.on_request(&ack, t0 + T1);
        assert_eq!(t.state(), State::Confirmed);
        t.on_timeout(t0 + T1 + T4);
        assert_eq!(t.state(), State::Terminated);
        // Without an ACK, H ends it with a timeout.
        let mut t = Transaction::server(inv.clone(), false);
        t.respond(&inv.response(500, "Oops", Some("s")), t0);
        t.on_timeout(t0 + 64 * T1);
        assert!(drain(&mut t).contains(&Output::Timeout));
    }

    #[test]
    fn keys_match_acks_to_invites() {
        let mut ack = req("ACK");
        ack.set("CSeq", "1 ACK");
        assert_eq!(server_key(&ack), server_key(&req("INVITE")));
        assert_ne!(server_key(&req("BYE")), server_key(&req("INVITE")));
        assert_eq!(client_key(&req("INVITE").response(180, "Ringing", None)).unwrap().1, "INVITE");
    }
}
