//! SIP metrics in the Prometheus text format, appended to `/metrics` of `hasp up` and
//! `hasp proxy`.

use crate::proxy::core::ProxyMetrics;
use crate::proxy::driver::DriverStats;
use crate::proxy::focus::Focus;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// What the SIP side exposes.
#[derive(Debug, Clone)]
pub struct SipMetrics {
    /// The proxy core's counters.
    pub proxy: Arc<ProxyMetrics>,
    /// The driver's (sockets, connections, queues).
    pub driver: Arc<DriverStats>,
    /// The conference focus, if this proxy is one.
    pub focus: Option<Arc<Focus>>,
}

impl SipMetrics {
    /// Appends every SIP metric to `out`.
    pub fn render(&self, out: &mut String) {
        let mut put = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let (p, d) = (&self.proxy, &self.driver);
        put("hasp_sip_malformed_total", "counter", "SIP messages that did not parse.", p.malformed.load(Relaxed));
        put("hasp_sip_rejected_total", "counter", "Requests answered 4xx/5xx by the proxy.", p.rejected.load(Relaxed));
        put("hasp_sip_forwarded_total", "counter", "Requests forwarded (per target).", p.forwarded.load(Relaxed));
        put("hasp_sip_registers_total", "counter", "REGISTER requests handled.", p.registers.load(Relaxed));
        put(
            "hasp_sip_rate_limited_total",
            "counter",
            "Requests dropped by the per-source rate limit.",
            p.rate_limited.load(Relaxed),
        );
        put("hasp_sip_transactions", "gauge", "SIP transactions in progress.", p.transactions.load(Relaxed));
        put(
            "hasp_sip_queue_drops_total",
            "counter",
            "Messages dropped because the proxy's queue was full.",
            d.queue_drops.load(Relaxed),
        );
        put("hasp_sip_send_drops_total", "counter", "Messages that could not be sent.", d.send_drops.load(Relaxed));
        put(
            "hasp_sip_tcp_connections_total",
            "counter",
            "TCP connections accepted or opened.",
            d.connections.load(Relaxed),
        );
        put("hasp_sip_tcp_connections_open", "gauge", "TCP connections open.", d.open.load(Relaxed));
        put(
            "hasp_sip_tcp_refused_total",
            "counter",
            "TCP connections refused over the limit.",
            d.refused.load(Relaxed),
        );
        put(
            "hasp_sip_tcp_bad_streams_total",
            "counter",
            "TCP connections closed because they did not frame as SIP.",
            d.bad_streams.load(Relaxed),
        );
        if let Some(f) = &self.focus {
            let (rooms, members) = f.counts();
            put("hasp_focus_rooms", "gauge", "Conference rooms the focus has open.", rooms as u64);
            put("hasp_focus_participants", "gauge", "Participants joined through the focus.", members as u64);
        }
    }
}
