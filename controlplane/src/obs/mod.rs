//! Observability: Prometheus metrics of the relay ([`relay`]), of the SIP proxy
//! ([`sip`]) and of the HTTP listeners ([`http`]), each a `prometheus_client` collector that reads its source's counters when
//! scraped, and [`render`], which encodes them for `/metrics`.
//!
//! The counters stay where they are (atomics of the workers, the proxy core and the SIP
//! driver, totals under the relay's lock): a collector copies them into
//! `ConstCounter`/`ConstGauge` values at scrape time, so nothing is counted twice and the
//! packet and SIP paths know nothing of Prometheus.

pub mod http;
pub mod relay;
pub mod sip;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;

/// `Content-Type` of what [`render`] produces: the Prometheus text format, version 0.0.4.
///
/// Not OpenMetrics (which the crate's `text` encoder writes): there a counter's `# TYPE`
/// and `# HELP` lines name the family without `_total`, and a gauge named `…_total`
/// (`hasp_relay_port_pairs_total`) is the spec's own example of a family name that may
/// clash with a counter's samples. The 0.0.4 encoder writes exactly the lines `/metrics`
/// always served, so dashboards, alerts and whatever parses the text see no change.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Encodes the collectors' metrics, in order, in the Prometheus text format (0.0.4).
///
/// The registry is built per scrape rather than once per process: the collectors hold
/// nothing but `Arc`s to their sources and read them when encoded, so a long-lived
/// registry would keep no state worth keeping, while building it here costs a few boxes
/// per scrape and leaves the API state (and the binary that assembles it) unchanged:
/// which sources a process has is already in that state (`sip` is optional).
pub fn render(collectors: Vec<Box<dyn Collector>>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    for c in collectors {
        registry.register_collector(c);
    }
    let mut out = String::with_capacity(8192);
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The two metric types hasp exposes; every value is a whole number.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        }
    }

    fn encode(self, m: MetricEncoder, v: u64) -> fmt::Result {
        match self {
            Kind::Counter => ConstCounter::new(v).encode(m),
            Kind::Gauge => ConstGauge::new(v).encode(m),
        }
    }
}

/// Encodes a family of one unlabelled sample.
///
/// `name` is the family's name: the encoder appends `_total` to a counter's, so
/// `hasp_sip_forwarded` is exposed as `hasp_sip_forwarded_total`.
pub(crate) fn single(e: &mut DescriptorEncoder, name: &str, help: &str, kind: Kind, v: u64) -> fmt::Result {
    kind.encode(e.encode_descriptor(name, help, None, kind.metric_type())?, v)
}

/// Encodes a family of labelled samples; the labels are written in the order given.
/// `name` as for [`single`].
pub(crate) fn family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut f = e.encode_descriptor(name, help, None, kind.metric_type())?;
    for (labels, v) in samples {
        kind.encode(f.encode_family(&labels)?, v)?;
    }
    Ok(())
}
