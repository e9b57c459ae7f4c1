//! The HTTP listeners' metrics (`net::http`), one sample per exported listener of the
//! process, labelled `listener="api"`. Part of every `/metrics`.

use super::{family, Kind};
use crate::net::http::ListenerStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// A collector over some listeners' counters, read when scraped.
#[derive(Debug, Clone)]
pub struct HttpCollector {
    listeners: Vec<Arc<ListenerStats>>,
}

impl HttpCollector {
    /// Every HTTP listener this process serves.
    pub fn process() -> Self {
        Self { listeners: crate::net::http::listeners() }
    }

    /// These listeners only.
    pub fn new(listeners: Vec<Arc<ListenerStats>>) -> Self {
        Self { listeners }
    }
}

impl Collector for HttpCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        use Kind::{Counter, Gauge};
        if self.listeners.is_empty() {
            return Ok(());
        }
        type Get = fn(&ListenerStats) -> &AtomicU64;
        // Counters are named without `_total`: the encoder appends it.
        let series: [(&str, Kind, &str, Get); 5] = [
            ("hasp_http_connections_accepted", Counter, "HTTP connections accepted and served.", |s| &s.accepted),
            ("hasp_http_connections_open", Gauge, "HTTP connections open.", |s| &s.open),
            (
                "hasp_http_connections_refused",
                Counter,
                "HTTP connections closed at once for being over the total or the per-source-IP cap.",
                |s| &s.refused,
            ),
            ("hasp_http_accept_backoffs", Counter, "Times accepting HTTP paused for lack of file descriptors.", |s| {
                &s.accept_backoffs
            }),
            ("hasp_http_timeouts", Counter, "HTTP connections closed by the header or idle timeout.", |s| &s.timeouts),
        ];
        for (name, kind, help, get) in series {
            let samples = self.listeners.iter().map(|s| ([("listener", s.name.to_string())], get(s).load(Relaxed)));
            family(&mut e, name, help, kind, samples)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listener_is_a_labelled_sample_of_each_family() {
        let (api, other) = (Arc::new(ListenerStats::new("api")), Arc::new(ListenerStats::new("other")));
        api.refused.store(3, Relaxed);
        other.accept_backoffs.store(2, Relaxed);
        api.open.store(1, Relaxed);
        let text = crate::obs::render(vec![Box::new(HttpCollector::new(vec![api, other]))]).unwrap();
        for line in [
            "# TYPE hasp_http_connections_refused_total counter",
            "# TYPE hasp_http_connections_open gauge",
            "hasp_http_connections_refused_total{listener=\"api\"} 3",
            "hasp_http_connections_refused_total{listener=\"other\"} 0",
            "hasp_http_accept_backoffs_total{listener=\"other\"} 2",
            "hasp_http_connections_open{listener=\"api\"} 1",
            "hasp_http_timeouts_total{listener=\"api\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }

    #[test]
    fn no_listener_no_family() {
        let text = crate::obs::render(vec![Box::new(HttpCollector::new(Vec::new()))]).unwrap();
        assert!(!text.contains("hasp_http_"), "{text}");
    }
}
