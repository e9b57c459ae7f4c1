//! The relay's metrics: sessions and ports from the relay's state, per worker the
//! counters the workers publish.

use super::{family, single, Kind};
use crate::relay::{Relay, Totals};
use dataplane::{DropReason, WorkerCountersSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use std::fmt;
use std::sync::Arc;

/// Reads the relay when scraped.
#[derive(Debug, Clone)]
pub struct RelayCollector {
    relay: Arc<Relay>,
}

impl RelayCollector {
    /// A collector of `relay`'s metrics.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay }
    }
}

impl Collector for RelayCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        Reading::of(&self.relay).encode(encoder)
    }
}

/// What one scrape reads from the relay. Kept apart from [`RelayCollector`] so the
/// encoding is tested without starting a data plane.
#[derive(Debug)]
struct Reading {
    sessions: usize,
    calls: usize,
    free_pairs: usize,
    total_pairs: usize,
    totals: Totals,
    /// Per worker: receive mode, pinned core, counters.
    workers: Vec<(&'static str, Option<usize>, WorkerCountersSnapshot)>,
}

impl Reading {
    fn of(relay: &Relay) -> Self {
        let (sessions, free_pairs, total_pairs, totals) = relay.usage();
        Self { sessions, calls: relay.calls(), free_pairs, total_pairs, totals, workers: relay.workers() }
    }
}

impl Collector for Reading {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        use Kind::{Counter, Gauge};
        let e = &mut e;
        let t = &self.totals;
        single(e, "hasp_relay_sessions", "Sessions currently allocated.", Gauge, self.sessions as u64)?;
        let help = "Calls (NG, RTPproxy, SIP) in the call registry.";
        single(e, "hasp_relay_calls", help, Gauge, self.calls as u64)?;
        single(e, "hasp_relay_port_pairs_free", "Free RTP/RTCP port pairs.", Gauge, self.free_pairs as u64)?;
        // A gauge, so the encoder adds no suffix: the name keeps the `_total` it has always had.
        let help = "RTP/RTCP port pairs in the configured range.";
        single(e, "hasp_relay_port_pairs_total", help, Gauge, self.total_pairs as u64)?;
        single(e, "hasp_relay_sessions_created", "Sessions created.", Counter, t.created)?;
        single(e, "hasp_relay_sessions_deleted", "Sessions deleted through the API.", Counter, t.deleted)?;
        single(e, "hasp_relay_sessions_timed_out", "Sessions deleted for inactivity.", Counter, t.timed_out)?;
        let rejected = [([("reason", "ports_exhausted")], t.exhausted)];
        family(e, "hasp_relay_sessions_rejected", "Creates refused, by reason.", Counter, rejected)?;

        let worker = |i: usize| ("worker", i.to_string());
        let info = self.workers.iter().enumerate().map(|(i, (mode, core, _))| {
            let core = core.map_or_else(|| "none".to_string(), |c| c.to_string());
            ([worker(i), ("io_mode", mode.to_string()), ("core", core)], 1)
        });
        family(e, "hasp_worker_info", "Worker receive mode and pinned core.", Gauge, info)?;
        type Get = fn(&WorkerCountersSnapshot) -> u64;
        let series: [(&str, Kind, &str, Get); 9] = [
            ("hasp_worker_rx_packets", Counter, "Packets received.", |c| c.rx_packets),
            ("hasp_worker_rx_bytes", Counter, "Bytes received.", |c| c.rx_bytes),
            ("hasp_worker_tx_packets", Counter, "Packets forwarded.", |c| c.tx_packets),
            ("hasp_worker_tx_bytes", Counter, "Bytes forwarded.", |c| c.tx_bytes),
            ("hasp_worker_ring_enters", Counter, "io_uring_enter calls (submit and wait).", |c| c.enters),
            ("hasp_worker_completions", Counter, "io_uring completions handled.", |c| c.completions),
            ("hasp_worker_buffer_exhausted", Counter, "Times every packet buffer was in flight.", |c| {
                c.buffer_exhausted
            }),
            ("hasp_worker_sessions", Gauge, "Sessions on the worker.", |c| c.sessions),
            ("hasp_worker_events_dropped", Counter, "Statistics events dropped on a full queue.", |c| c.events_dropped),
        ];
        for (name, kind, help, get) in series {
            let samples = self.workers.iter().enumerate().map(|(i, (_, _, c))| ([worker(i)], get(c)));
            family(e, name, help, kind, samples)?;
        }
        let drops = self.workers.iter().enumerate().flat_map(|(i, (_, _, c))| {
            DropReason::ALL.map(|r| ([worker(i), ("reason", r.as_str().to_string())], c.drops[r as usize]))
        });
        family(e, "hasp_worker_drops", "Packets not forwarded, by reason.", Counter, drops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::WorkerCounters;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn every_relay_family_is_exposed_with_its_type_and_the_values_read() {
        // Worker counters are set the way the workers publish them: stores into the
        // atomics, read back by the same snapshot the relay takes at scrape time.
        let (w0, w1) = (WorkerCounters::default(), WorkerCounters::default());
        w0.rx_packets.store(11, Relaxed);
        w1.tx_bytes.store(1_234_567, Relaxed);
        w1.sessions.store(3, Relaxed);
        w1.drops[DropReason::SourceMismatch as usize].store(5, Relaxed);
        let reading = Reading {
            sessions: 4,
            calls: 2,
            free_pairs: 42,
            total_pairs: 50,
            totals: Totals { created: 9, deleted: 2, timed_out: 1, exhausted: 7 },
            workers: vec![("multishot", Some(0), w0.snapshot()), ("oneshot", None, w1.snapshot())],
        };
        let text = crate::obs::render(vec![Box::new(reading)]).unwrap();

        let families = [
            ("hasp_relay_sessions", "gauge"),
            ("hasp_relay_calls", "gauge"),
            ("hasp_relay_port_pairs_free", "gauge"),
            ("hasp_relay_port_pairs_total", "gauge"),
            ("hasp_relay_sessions_created_total", "counter"),
            ("hasp_relay_sessions_deleted_total", "counter"),
            ("hasp_relay_sessions_timed_out_total", "counter"),
            ("hasp_relay_sessions_rejected_total", "counter"),
            ("hasp_worker_info", "gauge"),
            ("hasp_worker_rx_packets_total", "counter"),
            ("hasp_worker_rx_bytes_total", "counter"),
            ("hasp_worker_tx_packets_total", "counter"),
            ("hasp_worker_tx_bytes_total", "counter"),
            ("hasp_worker_ring_enters_total", "counter"),
            ("hasp_worker_completions_total", "counter"),
            ("hasp_worker_buffer_exhausted_total", "counter"),
            ("hasp_worker_sessions", "gauge"),
            ("hasp_worker_events_dropped_total", "counter"),
            ("hasp_worker_drops_total", "counter"),
        ];
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let want: Vec<String> = families.iter().map(|(n, t)| format!("# TYPE {n} {t}")).collect();
        assert_eq!(types, want, "{text}");
        for (name, _) in families {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{text}");
        }
        for sample in [
            "hasp_relay_sessions 4",
            "hasp_relay_calls 2",
            "hasp_relay_port_pairs_free 42",
            "hasp_relay_port_pairs_total 50",
            "hasp_relay_sessions_created_total 9",
            "hasp_relay_sessions_deleted_total 2",
            "hasp_relay_sessions_timed_out_total 1",
            "hasp_relay_sessions_rejected_total{reason=\"ports_exhausted\"} 7",
            "hasp_worker_info{worker=\"0\",io_mode=\"multishot\",core=\"0\"} 1",
            "hasp_worker_info{worker=\"1\",io_mode=\"oneshot\",core=\"none\"} 1",
            "hasp_worker_rx_packets_total{worker=\"0\"} 11",
            "hasp_worker_rx_packets_total{worker=\"1\"} 0",
            "hasp_worker_tx_bytes_total{worker=\"1\"} 1234567",
            "hasp_worker_sessions{worker=\"1\"} 3",
            "hasp_worker_drops_total{worker=\"1\",reason=\"source_mismatch\"} 5",
            "hasp_worker_drops_total{worker=\"0\",reason=\"truncated\"} 0",
        ] {
            assert!(text.lines().any(|l| l == sample), "no line {sample:?} in:\n{text}");
        }
        let drops = text.lines().filter(|l| l.starts_with("hasp_worker_drops_total{")).count();
        assert_eq!(drops, 2 * DropReason::COUNT, "every reason of every worker");
        assert!(text.ends_with("hasp_worker_drops_total{worker=\"1\",reason=\"truncated\"} 0\n"), "{text}");
    }
}
