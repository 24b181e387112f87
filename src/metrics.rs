//! Prometheus metrics, served by the admin endpoint at `GET /metrics`.
//!
//! Counted where things happen, per event and never per byte moved:
//! - `usher_logins_total{protocol, outcome}` — outcome `ok`, `rejected`
//!   (bad credentials, unknown or disabled user) or `unavailable` (no
//!   backend could take the session);
//! - `usher_sessions_ended_total{protocol}` and
//!   `usher_relayed_bytes_total{protocol, direction}` at each session's end.
//!
//! Read when scraped: `usher_sessions` (live sessions) and
//! `usher_backend_up{backend}` (a removed backend's goes within a minute).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::server::Shared;

/// Gauges not set for this long are dropped from the output: the state
/// gauges are set at every scrape, so only those of a removed backend go.
const STALE_GAUGE: Duration = Duration::from_secs(60);

/// Installs the process-wide recorder; `None` if one is installed already.
pub fn install() -> Option<PrometheusHandle> {
    PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(STALE_GAUGE))
        .install_recorder()
        .ok()
}

/// What a login came to.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    Rejected,
    Unavailable,
}

pub fn login(protocol: &'static str, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::Ok => "ok",
        Outcome::Rejected => "rejected",
        Outcome::Unavailable => "unavailable",
    };
    metrics::counter!("usher_logins_total", "protocol" => protocol, "outcome" => outcome)
        .increment(1);
}

/// A relayed session ended after moving these bytes.
pub fn session_ended(protocol: &'static str, up: u64, down: u64) {
    metrics::counter!("usher_sessions_ended_total", "protocol" => protocol).increment(1);
    metrics::counter!("usher_relayed_bytes_total", "protocol" => protocol, "direction" => "up")
        .increment(up);
    metrics::counter!("usher_relayed_bytes_total", "protocol" => protocol, "direction" => "down")
        .increment(down);
}

/// The text a scrape gets: the state gauges refreshed, then everything.
pub fn render(shared: &Shared, handle: &PrometheusHandle) -> String {
    metrics::gauge!("usher_sessions").set(shared.sessions.len() as f64);
    for h in shared.health.list() {
        let up = if h.up { 1.0 } else { 0.0 };
        metrics::gauge!("usher_backend_up", "backend" => h.backend).set(up);
    }
    handle.render()
}
