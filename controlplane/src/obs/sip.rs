//! The SIP side's metrics (proxy core, driver, conference focus), part of `/metrics` of
//! `hasp up` and `hasp proxy`.

use super::{single, Kind};
use crate::proxy::core::ProxyMetrics;
use crate::proxy::driver::DriverStats;
use crate::proxy::focus::Focus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// What the SIP side exposes; a collector that reads these when scraped.
#[derive(Debug, Clone)]
pub struct SipMetrics {
    /// The proxy core's counters.
    pub proxy: Arc<ProxyMetrics>,
    /// The driver's (sockets, connections, queues).
    pub driver: Arc<DriverStats>,
    /// The conference focus, if this proxy is one.
    pub focus: Option<Arc<Focus>>,
}

impl Collector for SipMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        use Kind::{Counter, Gauge};
        let (p, d) = (&self.proxy, &self.driver);
        // Counters are named without `_total`: the encoder appends it.
        let series: [(&str, Kind, &str, &AtomicU64); 28] = [
            ("hasp_sip_malformed", Counter, "SIP messages that did not parse.", &p.malformed),
            ("hasp_sip_rejected", Counter, "Requests answered 4xx/5xx by the proxy.", &p.rejected),
            ("hasp_sip_forwarded", Counter, "Requests forwarded (per target).", &p.forwarded),
            ("hasp_sip_registers", Counter, "REGISTER requests handled.", &p.registers),
            ("hasp_sip_rate_limited", Counter, "Requests dropped by the per-source rate limit.", &p.rate_limited),
            (
                "hasp_sip_challenged",
                Counter,
                "Requests challenged for credentials (407) by the relay policy.",
                &p.challenged,
            ),
            ("hasp_sip_not_relayed", Counter, "Requests refused as relaying (403 Not relaying).", &p.not_relayed),
            ("hasp_sip_digest_replays", Counter, "Digest answers replayed (challenged again, stale).", &p.replays),
            ("hasp_sip_bans", Counter, "Sources banned for going over the per-source rate.", &p.bans),
            (
                "hasp_sip_timer_c",
                Counter,
                "INVITE branches cancelled by Timer C (a provisional, then silence).",
                &p.timer_c,
            ),
            (
                "hasp_sip_stray_responses",
                Counter,
                "Responses dropped: not from the peer the request went to.",
                &p.stray_responses,
            ),
            (
                "hasp_sip_replies_suppressed",
                Counter,
                "Error answers not sent: the source had its share (reflection bound).",
                &p.replies_suppressed,
            ),
            ("hasp_sip_transactions", Gauge, "SIP transactions in progress.", &p.transactions),
            ("hasp_sip_queue_drops", Counter, "Messages dropped because the proxy's queue was full.", &d.queue_drops),
            ("hasp_sip_send_drops", Counter, "Messages that could not be sent.", &d.send_drops),
            ("hasp_sip_tcp_connections", Counter, "TCP connections accepted or opened.", &d.connections),
            ("hasp_sip_tcp_connections_open", Gauge, "TCP connections open.", &d.open),
            ("hasp_sip_tcp_refused", Counter, "TCP connections refused over the limit.", &d.refused),
            (
                "hasp_sip_tcp_bad_streams",
                Counter,
                "TCP connections closed because they did not frame as SIP.",
                &d.bad_streams,
            ),
            ("hasp_sip_ops_started", Counter, "Operations started (store, anchor, resolve, focus).", &p.ops_started),
            ("hasp_sip_ops_failed", Counter, "Operations that completed with an error.", &p.ops_failed),
            ("hasp_sip_ops_timed_out", Counter, "Operations given up at their deadline.", &p.ops_timed_out),
            ("hasp_sip_ops_pending", Gauge, "Operations awaited by the SIP cores.", &p.ops_pending),
            ("hasp_sip_steered", Counter, "Messages handed to the SIP core that owns them.", &d.steered),
            (
                "hasp_sip_tcp_accept_backoffs",
                Counter,
                "Times accepting SIP over TCP paused for lack of descriptors.",
                &d.accept_backoffs,
            ),
            (
                "hasp_sip_flows_skipped",
                Counter,
                "Bindings not tried: the load balancer holding their flow is no longer a member.",
                &p.flows_skipped,
            ),
            (
                "hasp_sip_flow_failed",
                Counter,
                "Requests answered 430 Flow Failed: every flow of the callee went through a load balancer that is gone.",
                &p.flow_failed,
            ),
            ("hasp_sip_live_lbs", Gauge, "Load balancers live in membership, as the proxy last heard.", &p.live_lbs),
        ];
        for (name, kind, help, v) in series {
            single(&mut e, name, help, kind, v.load(Relaxed))?;
        }
        if let Some(f) = &self.focus {
            let (rooms, members) = f.counts();
            single(&mut e, "hasp_focus_rooms", "Conference rooms the focus has open.", Gauge, rooms as u64)?;
            let help = "Participants joined through the focus.";
            single(&mut e, "hasp_focus_participants", help, Gauge, members as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::focus::tests::FakeMixer;

    const FAMILIES: [(&str, &str); 28] = [
        ("hasp_sip_malformed_total", "counter"),
        ("hasp_sip_rejected_total", "counter"),
        ("hasp_sip_forwarded_total", "counter"),
        ("hasp_sip_registers_total", "counter"),
        ("hasp_sip_rate_limited_total", "counter"),
        ("hasp_sip_challenged_total", "counter"),
        ("hasp_sip_not_relayed_total", "counter"),
        ("hasp_sip_digest_replays_total", "counter"),
        ("hasp_sip_bans_total", "counter"),
        ("hasp_sip_timer_c_total", "counter"),
        ("hasp_sip_stray_responses_total", "counter"),
        ("hasp_sip_replies_suppressed_total", "counter"),
        ("hasp_sip_transactions", "gauge"),
        ("hasp_sip_queue_drops_total", "counter"),
        ("hasp_sip_send_drops_total", "counter"),
        ("hasp_sip_tcp_connections_total", "counter"),
        ("hasp_sip_tcp_connections_open", "gauge"),
        ("hasp_sip_tcp_refused_total", "counter"),
        ("hasp_sip_tcp_bad_streams_total", "counter"),
        ("hasp_sip_ops_started_total", "counter"),
        ("hasp_sip_ops_failed_total", "counter"),
        ("hasp_sip_ops_timed_out_total", "counter"),
        ("hasp_sip_ops_pending", "gauge"),
        ("hasp_sip_steered_total", "counter"),
        ("hasp_sip_tcp_accept_backoffs_total", "counter"),
        ("hasp_sip_flows_skipped_total", "counter"),
        ("hasp_sip_flow_failed_total", "counter"),
        ("hasp_sip_live_lbs", "gauge"),
    ];

    fn types(text: &str) -> Vec<&str> {
        text.lines().filter(|l| l.starts_with("# TYPE ")).collect()
    }

    #[test]
    fn every_sip_family_is_exposed_with_its_type_and_the_values_in_the_atomics() {
        let m = SipMetrics { proxy: Arc::default(), driver: Arc::default(), focus: None };
        m.proxy.forwarded.store(17, Relaxed);
        m.proxy.transactions.store(4, Relaxed);
        m.driver.connections.store(6, Relaxed);
        m.driver.open.store(2, Relaxed);
        m.driver.bad_streams.store(1, Relaxed);
        let text = crate::obs::render(vec![Box::new(m.clone())]).unwrap();

        let want: Vec<String> = FAMILIES.iter().map(|(n, t)| format!("# TYPE {n} {t}")).collect();
        assert_eq!(types(&text), want, "{text}");
        for (name, _) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{text}");
        }
        for sample in [
            "hasp_sip_malformed_total 0",
            "hasp_sip_forwarded_total 17",
            "hasp_sip_transactions 4",
            "hasp_sip_tcp_connections_total 6",
            "hasp_sip_tcp_connections_open 2",
            "hasp_sip_tcp_bad_streams_total 1",
        ] {
            assert!(text.lines().any(|l| l == sample), "no line {sample:?} in:\n{text}");
        }
        // Read at scrape time: a later change shows in the next scrape.
        m.proxy.forwarded.fetch_add(1, Relaxed);
        let text = crate::obs::render(vec![Box::new(m)]).unwrap();
        assert!(text.lines().any(|l| l == "hasp_sip_forwarded_total 18"), "{text}");
    }

    #[test]
    fn a_focus_adds_its_rooms_and_participants() {
        let focus = Arc::new(Focus::new(vec![Arc::new(FakeMixer::default())]));
        let offer = "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
            m=audio 5000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
        focus.join("standup", "call-1", offer).unwrap();
        focus.join("standup", "call-2", offer).unwrap();
        let m = SipMetrics { proxy: Arc::default(), driver: Arc::default(), focus: Some(focus) };
        let text = crate::obs::render(vec![Box::new(m)]).unwrap();

        let types = types(&text);
        assert_eq!(
            &types[FAMILIES.len()..],
            ["# TYPE hasp_focus_rooms gauge", "# TYPE hasp_focus_participants gauge"],
            "{text}"
        );
        for sample in ["hasp_focus_rooms 1", "hasp_focus_participants 2"] {
            assert!(text.lines().any(|l| l == sample), "no line {sample:?} in:\n{text}");
        }
    }
}
