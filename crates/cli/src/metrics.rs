//! A Prometheus text endpoint (`/metrics`) for `serve-firecracker`: the
//! metrics are encoded by the `prometheus-client` crate and served over
//! HTTP by `tiny_http`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use anyhow::Context;
use livepage_restore::firecracker::Metrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Reads the server's counters at each scrape.
#[derive(Debug)]
struct Server(Arc<Metrics>);

/// The fault-latency histogram, from log2 µs buckets.
struct Latency {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Server {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let (t, hist) = m.totals();
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let g = ConstGauge::new(v as i64);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        };
        gauge(
            &mut enc,
            "livepage_vms_connected",
            "Firecracker VMs being served now",
            m.connected.load(Ordering::SeqCst),
        )?;
        counter(
            &mut enc,
            "livepage_vms_accepted",
            "VMs whose handshake was accepted",
            m.accepted.load(Ordering::SeqCst),
        )?;
        counter(
            &mut enc,
            "livepage_vms_rejected",
            "Handshakes refused",
            m.rejected.load(Ordering::SeqCst),
        )?;
        counter(
            &mut enc,
            "livepage_vms_failed",
            "VMs whose serving failed (failed closed)",
            m.failed.load(Ordering::SeqCst),
        )?;
        counter(
            &mut enc,
            "livepage_faults_served",
            "Page faults that placed a page",
            t.faults_served,
        )?;
        counter(
            &mut enc,
            "livepage_pages_prefetched",
            "Pages placed in the background",
            t.prefetched,
        )?;
        counter(
            &mut enc,
            "livepage_pages_zero_filled",
            "Pages answered with zeros",
            t.zero_filled,
        )?;
        counter(
            &mut enc,
            "livepage_pages_left_to_kernel",
            "Pages of zero runs left to the kernel",
            t.left_to_kernel,
        )?;
        counter(
            &mut enc,
            "livepage_pages_lost",
            "Pages the snapshot could not give (poisoned)",
            t.lost,
        )?;
        // Bucket i counts faults below 2^i µs.
        let mut buckets: Vec<(f64, u64)> = hist
            .iter()
            .enumerate()
            .map(|(i, c)| ((1u64 << i) as f64 / 1e6, *c))
            .collect();
        // OpenMetrics ends every histogram with a +Inf bucket.
        buckets.push((f64::MAX, 0));
        let count = hist.iter().sum();
        // Each fault counted at its bucket's midpoint: the sum is an estimate.
        let sum = hist
            .iter()
            .enumerate()
            .map(|(i, c)| *c as f64 * (1u64 << i) as f64 * 0.75 / 1e6)
            .sum();
        let lat = Latency {
            buckets,
            count,
            sum,
        };
        lat.encode(enc.encode_descriptor(
            "livepage_fault_latency_seconds",
            "Demand-fault service time, read to resolved",
            None,
            lat.metric_type(),
        )?)
    }
}

/// A running metrics endpoint; dropping it stops it.
pub struct Endpoint {
    http: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Endpoint {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `metrics` on `addr` at `/metrics`.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<Endpoint> {
    let http = Arc::new(
        tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("listening for metrics on {addr}"))?,
    );
    let bound = http
        .server_addr()
        .to_ip()
        .context("the metrics endpoint has no IP address")?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Server(metrics)));
    let h2 = http.clone();
    let thread = std::thread::Builder::new()
        .name("lp-metrics".into())
        .spawn(move || {
            for req in h2.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => tiny_http::Response::from_string(body).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                            )
                            .expect("a constant header is valid"),
                        ),
                        Err(_) => tiny_http::Response::from_string("encoding failed\n")
                            .with_status_code(500),
                    }
                } else {
                    tiny_http::Response::from_string("livepage serves /metrics\n")
                        .with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .context("starting the metrics thread")?;
    Ok(Endpoint {
        http,
        thread: Some(thread),
        addr: bound,
    })
}
