//! Prometheus text exposition of the relay's counters.

use crate::relay::Relay;
use dataplane::DropReason;
use std::fmt::Write;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(relay: &Relay) -> String {
    let mut o = String::with_capacity(4096);
    let (sessions, free, total, t) = relay.usage();
    family(&mut o, "hasp_relay_sessions", "gauge", "Sessions currently allocated.");
    let _ = writeln!(o, "hasp_relay_sessions {sessions}");
    family(&mut o, "hasp_relay_port_pairs_free", "gauge", "Free RTP/RTCP port pairs.");
    let _ = writeln!(o, "hasp_relay_port_pairs_free {free}");
    family(&mut o, "hasp_relay_port_pairs_total", "gauge", "RTP/RTCP port pairs in the configured range.");
    let _ = writeln!(o, "hasp_relay_port_pairs_total {total}");
    family(&mut o, "hasp_relay_sessions_created_total", "counter", "Sessions created.");
    let _ = writeln!(o, "hasp_relay_sessions_created_total {}", t.created);
    family(&mut o, "hasp_relay_sessions_deleted_total", "counter", "Sessions deleted through the API.");
    let _ = writeln!(o, "hasp_relay_sessions_deleted_total {}", t.deleted);
    family(&mut o, "hasp_relay_sessions_timed_out_total", "counter", "Sessions deleted for inactivity.");
    let _ = writeln!(o, "hasp_relay_sessions_timed_out_total {}", t.timed_out);
    family(&mut o, "hasp_relay_sessions_rejected_total", "counter", "Creates refused, by reason.");
    let _ = writeln!(o, "hasp_relay_sessions_rejected_total{{reason=\"ports_exhausted\"}} {}", t.exhausted);

    let workers = relay.workers();
    family(&mut o, "hasp_worker_info", "gauge", "Worker receive mode and pinned core.");
    for (i, (mode, core, _)) in workers.iter().enumerate() {
        let core = core.map_or_else(|| "none".to_string(), |c| c.to_string());
        let _ = writeln!(o, "hasp_worker_info{{worker=\"{i}\",io_mode=\"{mode}\",core=\"{core}\"}} 1");
    }
    type Get = fn(&dataplane::WorkerCountersSnapshot) -> u64;
    let series: [(&str, &str, &str, Get); 9] = [
        ("hasp_worker_rx_packets_total", "counter", "Packets received.", |c| c.rx_packets),
        ("hasp_worker_rx_bytes_total", "counter", "Bytes received.", |c| c.rx_bytes),
        ("hasp_worker_tx_packets_total", "counter", "Packets forwarded.", |c| c.tx_packets),
        ("hasp_worker_tx_bytes_total", "counter", "Bytes forwarded.", |c| c.tx_bytes),
        ("hasp_worker_ring_enters_total", "counter", "io_uring_enter calls (submit and wait).", |c| c.enters),
        ("hasp_worker_completions_total", "counter", "io_uring completions handled.", |c| c.completions),
        ("hasp_worker_buffer_exhausted_total", "counter", "Times every packet buffer was in flight.", |c| {
            c.buffer_exhausted
        }),
        ("hasp_worker_sessions", "gauge", "Sessions on the worker.", |c| c.sessions),
        ("hasp_worker_events_dropped_total", "counter", "Statistics events dropped on a full queue.", |c| {
            c.events_dropped
        }),
    ];
    for (name, kind, help, get) in series {
        family(&mut o, name, kind, help);
        for (i, (_, _, c)) in workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", get(c));
        }
    }
    family(&mut o, "hasp_worker_drops_total", "counter", "Packets not forwarded, by reason.");
    for (i, (_, _, c)) in workers.iter().enumerate() {
        for r in DropReason::ALL {
            let _ = writeln!(
                o,
                "hasp_worker_drops_total{{worker=\"{i}\",reason=\"{}\"}} {}",
                r.as_str(),
                c.drops[r as usize]
            );
        }
    }
    o
}
