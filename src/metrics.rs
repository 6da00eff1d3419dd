//! Prometheus metrics: one struct, registered into a registry the caller owns (never a global, so
//! tests can run many servers in one process), and the small HTTP endpoint that serves it.
//!
//! Names start with `consul_dns_forwarder_`, use base units, and never carry a query name as a
//! label (unbounded cardinality).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::answer::Source;
use crate::reply::Transport;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus::{
    local::LocalHistogram, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const NS: &str = "consul_dns_forwarder";

/// The values of `limit_drops_total{limit}`:
/// - `watchers`: a service view not started because `consul::http::MAX_WATCHERS` are running;
/// - `on_demand`: a remembered node or prepared-query answer forgotten to stay within
///   `consul::on_demand::MAX_ON_DEMAND`;
/// - `unverified_lookups`: a Consul lookup not sent because the name could not be checked
///   against the catalog and `consul::inventory`'s budget for such lookups was spent;
/// - `service_series`: a `consul_healthy_instances` series not created, beyond
///   `consul::views::MAX_SERVICE_SERIES`;
/// - `ptr_addresses`: an index of the addresses Consul's PTR answers come from was cut at
///   `consul::ptr::MAX_PTR_ADDRESSES` (once per index built).
pub(crate) const LIMIT_LABELS: [&str; 5] = [
    "watchers",
    "on_demand",
    "unverified_lookups",
    "service_series",
    PTR_LIMIT_LABEL,
];

/// The `limit_drops_total` label of the PTR address bound (kept here with the others, so that
/// metrics depends on no answer source).
pub(crate) const PTR_LIMIT_LABEL: &str = "ptr_addresses";

/// Request latency buckets: from 50 µs (a cache hit) to several seconds (an upstream timeout).
const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every series the forwarder exports.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) responses: IntCounterVec,
    /// By `source` (cache, consul, upstream, stale, local): Consul's latency apart from the
    /// upstreams'.
    pub(crate) request_duration: HistogramVec,
    /// Children of `request_duration`, one per [`Source`] in [`SOURCES`] order, resolved once:
    /// the cache-hit path observes without hashing labels.
    request_duration_by: Arc<[Histogram; SOURCES.len()]>,
    pub(crate) cache_hits: IntCounter,
    pub(crate) cache_misses: IntCounter,
    pub(crate) consul_encoded_answers: IntCounter,
    pub(crate) cache_entries: IntGauge,
    pub(crate) cache_evictions: IntCounter,
    pub(crate) stale_answers: IntCounter,
    pub(crate) upstream_duration: HistogramVec,
    pub(crate) upstream_errors: IntCounterVec,
    pub(crate) upstream_rejected: IntCounter,
    pub(crate) upstream_unmatched_replies: IntCounterVec,
    pub(crate) upstream_case_fallbacks: IntCounter,
    /// Upstream failures remembered per question (RFC 9520), by reason.
    pub(crate) failures_cached: IntCounterVec,
    /// Queries answered SERVFAIL from a remembered failure, without asking upstream.
    pub(crate) cached_failure_answers: IntCounter,
    pub(crate) rate_limited: IntCounter,
    pub(crate) truncated: IntCounterVec,
    pub(crate) refused_clients: IntCounterVec,
    pub(crate) dropped: IntCounterVec,
    pub(crate) tcp_connections: IntGauge,
    pub(crate) consul_requests: IntCounterVec,
    pub(crate) consul_watchers: IntGauge,
    pub(crate) consul_last_contact: IntGauge,
    pub(crate) consul_contact_age: prometheus::Gauge,
    pub(crate) reloads: IntCounterVec,
    pub consul_healthy_instances: IntGaugeVec,
    pub(crate) consul_health_changes: IntCounter,
    /// What a bound on client-keyed state turned away or forgot, by bound (see
    /// [`LIMIT_LABELS`]): the caps that keep names from clients from growing the forwarder.
    pub(crate) limit_drops: IntCounterVec,
    pub(crate) build_info: IntGaugeVec,
    /// Children of `requests`, resolved on first use and kept: `with_label_values` hashes the
    /// labels and takes a lock on every call, which shows in the hot path's profile. Indexed by
    /// `request_slot`.
    hot_requests: Arc<[OnceLock<IntCounter>; REQUEST_SLOTS]>,
    /// `responses{source="cache"}` for NOERROR and NXDOMAIN, the hot path's two outcomes, and
    /// `responses{source="consul"}` for NOERROR (its pre-encoded answers).
    hot_cache_responses: Arc<[OnceLock<IntCounter>; 3]>,
}

/// Every [`Source`], in the order of `Metrics::request_duration_by`.
const SOURCES: [Source; 5] = [
    Source::Cache,
    Source::Consul,
    Source::Upstream,
    Source::Stale,
    Source::Local,
];

/// Where `source` is in [`SOURCES`].
fn source_index(source: Source) -> usize {
    match source {
        Source::Cache => 0,
        Source::Consul => 1,
        Source::Upstream => 2,
        Source::Stale => 3,
        Source::Local => 4,
    }
}

/// The revision the binary was built from, set by build.rs; "unknown" without one.
const REVISION: &str = match option_env!("CONSUL_DNS_FORWARDER_REVISION") {
    Some(r) => r,
    None => match option_env!("CDF_GIT_REVISION") {
        Some(r) => r,
        None => "unknown",
    },
};

/// The `reason` label values of `upstream_unmatched_replies_total`.
pub(crate) const UNMATCHED_REASONS: [&str; 4] = ["id", "question", "case", "malformed"];

/// The `qtype` label values; anything else is "other" (bounded cardinality).
const QTYPE_LABELS: [&str; 12] = [
    "A", "AAAA", "SRV", "TXT", "CNAME", "PTR", "MX", "NS", "SOA", "ANY", "HTTPS", "other",
];

/// protocol (2) × zone (2) × qtype label.
const REQUEST_SLOTS: usize = 2 * 2 * QTYPE_LABELS.len();

fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::SRV => 2,
        RecordType::TXT => 3,
        RecordType::CNAME => 4,
        RecordType::PTR => 5,
        RecordType::MX => 6,
        RecordType::NS => 7,
        RecordType::SOA => 8,
        RecordType::ANY => 9,
        RecordType::HTTPS => 10,
        _ => 11,
    }
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Arc<Metrics>, MetricsError> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NS);
        let request_duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time from receiving a request to having its response ready, by where the answer came from (cache, consul, upstream, stale, local).")
                .namespace(NS)
                .buckets(DURATION_BUCKETS.to_vec()),
            &["source"],
        )?;
        let m = Metrics {
            requests: IntCounterVec::new(
                opts("requests_total", "DNS requests received, by protocol, query type and zone (consul or forwarded)."),
                &["protocol", "qtype", "zone"],
            )?,
            responses: IntCounterVec::new(
                opts("responses_total", "DNS responses sent, by rcode and by where the answer came from (cache, consul, upstream, stale, local)."),
                &["rcode", "source"],
            )?,
            request_duration: request_duration.clone(),
            request_duration_by: Arc::new(SOURCES.map(|s| {
                request_duration.with_label_values(&[s.as_str()])
            })),
            cache_hits: IntCounter::with_opts(opts("cache_hits_total", "Forwarded questions answered from the cache."))?,
            cache_misses: IntCounter::with_opts(opts("cache_misses_total", "Forwarded questions not in the cache (or expired)."))?,
            consul_encoded_answers: IntCounter::with_opts(opts("consul_encoded_answers_total", "Consul service answers written from their pre-encoded records (the hot path), also counted in responses_total{source=\"consul\"}."))?,
            cache_entries: IntGauge::with_opts(opts("cache_entries", "Entries in the answer cache, including expired ones kept for serve-stale."))?,
            cache_evictions: IntCounter::with_opts(opts("cache_evictions_total", "Cache entries evicted to stay within cache.max_entries (expiry is not counted)."))?,
            stale_answers: IntCounter::with_opts(opts("stale_answers_total", "Answers served from expired data because every upstream (or Consul) failed."))?,
            upstream_duration: HistogramVec::new(
                HistogramOpts::new("upstream_request_duration_seconds", "Time of one attempt at one upstream server.")
                    .namespace(NS)
                    .buckets(DURATION_BUCKETS.to_vec()),
                &["upstream"],
            )?,
            upstream_errors: IntCounterVec::new(
                opts("upstream_errors_total", "Failed attempts at an upstream server, by kind (timeout, io, rcode)."),
                &["upstream", "kind"],
            )?,
            upstream_rejected: IntCounter::with_opts(opts("upstream_inflight_rejected_total", "Cache misses answered at once (stale or SERVFAIL) because upstream.max_inflight fetches were already in flight."))?,
            upstream_unmatched_replies: IntCounterVec::new(
                opts("upstream_unmatched_replies_total", "Replies from an upstream server that matched no question we asked it, ignored (a rise means spoofing attempts, or a broken upstream), by reason: id (wrong ID or not a response), question (another name, type or class), case (the name's letter case differs from our 0x20 randomised question, see upstream.randomize_case), malformed (does not parse). Replies from other addresses never reach the connected socket."),
                &["reason"],
            )?,
            upstream_case_fallbacks: IntCounter::with_opts(opts("upstream_case_fallbacks_total", "Questions re-asked without 0x20 case randomisation because the upstream's reply did not keep our letter case (upstream.randomize_case)."))?,
            failures_cached: IntCounterVec::new(
                opts("upstream_failures_cached_total", "Questions whose upstreams failed, remembered so that they are not asked again for cache.failure_ttl (doubling while the failure persists, up to cache.failure_ttl_max; RFC 9520), by reason: servfail, refused, timeout, unreachable, other (another error rcode, or an answer that cannot be stored)."),
                &["reason"],
            )?,
            cached_failure_answers: IntCounter::with_opts(opts("cached_failure_answers_total", "Queries answered SERVFAIL from a remembered upstream failure, without asking upstream (stale data, when there is some, is served instead and counted in stale_answers_total)."))?,
            rate_limited: IntCounter::with_opts(opts("rate_limited_total", "UDP queries over server.rate_limit for their client network: answered with an empty TC=1 reply, or dropped when the reply would be an error such as REFUSED (those are also in dropped_packets_total{reason=\"rate_limit\"})."))?,
            truncated: IntCounterVec::new(
                opts("truncated_responses_total", "Responses sent with TC=1 because the answer did not fit."),
                &["protocol"],
            )?,
            refused_clients: IntCounterVec::new(
                opts("refused_clients_total", "Requests refused because the client is outside server.allow."),
                &["protocol"],
            )?,
            dropped: IntCounterVec::new(
                opts("dropped_packets_total", "Packets dropped without an answer, by reason."),
                &["reason"],
            )?,
            tcp_connections: IntGauge::with_opts(opts("tcp_connections", "Open TCP client connections."))?,
            consul_requests: IntCounterVec::new(
                opts("consul_requests_total", "HTTP requests to Consul, by endpoint and outcome."),
                &["endpoint", "outcome"],
            )?,
            consul_watchers: IntGauge::with_opts(opts("consul_watchers", "Active Consul watchers (one per watched service view)."))?,
            consul_last_contact: IntGauge::with_opts(opts("consul_last_success_timestamp_seconds", "Unix time of the last successful Consul HTTP request (0 = never)."))?,
            consul_contact_age: prometheus::Gauge::with_opts(opts("consul_last_success_age_seconds", "Seconds since the last successful Consul HTTP request (-1 = never)."))?,
            reloads: IntCounterVec::new(
                opts("config_reloads_total", "Configuration reloads (SIGHUP), by outcome (success, failure)."),
                &["outcome"],
            )?,
            consul_healthy_instances: IntGaugeVec::new(
                opts("consul_healthy_instances", "Healthy instances per watched service."),
                &["service"],
            )?,
            consul_health_changes: IntCounter::with_opts(opts("consul_view_changes_total", "Changes of a watched service view seen through blocking queries."))?,
            limit_drops: IntCounterVec::new(
                opts("limit_drops_total", "Work or state a bound on client-keyed state refused or forgot, by bound."),
                &["limit"],
            )?,
            hot_requests: Arc::new(std::array::from_fn(|_| OnceLock::new())),
            hot_cache_responses: Arc::new(std::array::from_fn(|_| OnceLock::new())),
            build_info: IntGaugeVec::new(
                opts("build_info", "Always 1; the labels carry the version and the git revision built."),
                &["version", "revision"],
            )?,
        };
        m.register(registry)?;
        m.create_initial_series();
        Ok(Arc::new(m))
    }

    /// Registers every series into the caller's registry.
    fn register(&self, registry: &Registry) -> Result<(), MetricsError> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.responses.clone()))?;
        registry.register(Box::new(self.request_duration.clone()))?;
        registry.register(Box::new(self.cache_hits.clone()))?;
        registry.register(Box::new(self.cache_misses.clone()))?;
        registry.register(Box::new(self.consul_encoded_answers.clone()))?;
        registry.register(Box::new(self.cache_entries.clone()))?;
        registry.register(Box::new(self.stale_answers.clone()))?;
        registry.register(Box::new(self.cache_evictions.clone()))?;
        registry.register(Box::new(self.consul_contact_age.clone()))?;
        registry.register(Box::new(self.reloads.clone()))?;
        registry.register(Box::new(self.upstream_duration.clone()))?;
        registry.register(Box::new(self.upstream_errors.clone()))?;
        registry.register(Box::new(self.truncated.clone()))?;
        registry.register(Box::new(self.upstream_rejected.clone()))?;
        registry.register(Box::new(self.upstream_unmatched_replies.clone()))?;
        registry.register(Box::new(self.upstream_case_fallbacks.clone()))?;
        registry.register(Box::new(self.failures_cached.clone()))?;
        registry.register(Box::new(self.cached_failure_answers.clone()))?;
        registry.register(Box::new(self.rate_limited.clone()))?;
        registry.register(Box::new(self.refused_clients.clone()))?;
        registry.register(Box::new(self.dropped.clone()))?;
        registry.register(Box::new(self.tcp_connections.clone()))?;
        registry.register(Box::new(self.consul_requests.clone()))?;
        registry.register(Box::new(self.consul_watchers.clone()))?;
        registry.register(Box::new(self.consul_last_contact.clone()))?;
        registry.register(Box::new(self.consul_healthy_instances.clone()))?;
        registry.register(Box::new(self.consul_health_changes.clone()))?;
        registry.register(Box::new(self.limit_drops.clone()))?;
        registry.register(Box::new(self.build_info.clone()))?;
        // process_* (resident memory, open and maximum fds, CPU seconds, start time), read
        // from /proc at each scrape.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(())
    }

    /// Creates the series that must exist from the start.
    fn create_initial_series(&self) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION])
            .set(1);
        // Series that exist from the start, at 0, so dashboards and alerts see them before the
        // first event (a counter that appears only on its first increment hides that increment
        // from rate()).
        for protocol in ["udp", "tcp"] {
            self.refused_clients.with_label_values(&[protocol]);
            self.truncated.with_label_values(&[protocol]);
        }
        for reason in [
            "short",
            "response",
            "overload",
            "tcp_connection_limit",
            "tcp_network_limit",
            "rate_limit",
        ] {
            self.dropped.with_label_values(&[reason]);
        }
        for limit in LIMIT_LABELS {
            self.limit_drops.with_label_values(&[limit]);
        }
        for reason in UNMATCHED_REASONS {
            self.upstream_unmatched_replies.with_label_values(&[reason]);
        }
        for outcome in ["success", "failure"] {
            self.reloads.with_label_values(&[outcome]);
        }
        for reason in crate::cache::FAILURE_REASONS {
            self.failures_cached.with_label_values(&[reason]);
        }
    }

    /// Counts one request: `requests_total{protocol, qtype, zone}`.
    pub(crate) fn count_request(&self, transport: Transport, qtype: RecordType, consul: bool) {
        let t = usize::from(transport == Transport::Tcp);
        let slot = (t * 2 + usize::from(consul)) * QTYPE_LABELS.len() + qtype_index(qtype);
        let zone = if consul { "consul" } else { "forwarded" };
        self.hot_requests[slot]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[transport.as_str(), qtype_label(qtype), zone])
            })
            .inc();
    }

    /// Observes one request's time: `request_duration_seconds{source}`.
    pub(crate) fn observe_request(&self, source: Source, took: Duration) {
        self.request_duration_by[source_index(source)].observe(took.as_secs_f64());
    }

    /// `request_duration_seconds{source="cache"}` for one task to fill without atomics and
    /// flush once per batch of answers (the UDP loop's hits).
    pub(crate) fn hit_durations(&self) -> LocalHistogram {
        self.request_duration_by[source_index(Source::Cache)].local()
    }

    /// Counts one response: `responses_total{rcode, source}`.
    pub(crate) fn count_response(&self, rcode: ResponseCode, source: Source) {
        let hot = match (source, rcode) {
            (Source::Cache, ResponseCode::NoError) => Some(0),
            (Source::Cache, ResponseCode::NXDomain) => Some(1),
            (Source::Consul, ResponseCode::NoError) => Some(2),
            _ => None,
        };
        let child = || {
            self.responses
                .with_label_values(&[rcode_label(rcode), source.as_str()])
        };
        match hot {
            Some(i) => self.hot_cache_responses[i].get_or_init(child).inc(),
            None => child().inc(),
        }
    }

    /// Updates the derived "seconds since last Consul contact" gauge (called at scrape time).
    pub(crate) fn refresh_consul_age(&self) {
        let last = self.consul_last_contact.get();
        if last <= 0 {
            self.consul_contact_age.set(-1.0);
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.consul_contact_age.set((now - last as f64).max(0.0));
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub(crate) fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub(crate) fn stale_served(&self) {
        self.stale_answers.inc();
    }

    /// The `upstream_duration_seconds` histogram of one upstream, for its caller to keep.
    pub(crate) fn upstream_duration_of(&self, upstream: &str) -> prometheus::Histogram {
        self.upstream_duration.with_label_values(&[upstream])
    }

    pub(crate) fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }

    /// Counts one upstream reply that matched no question (`reason`: one of
    /// [`UNMATCHED_REASONS`]).
    pub(crate) fn upstream_unmatched(&self, reason: &str) {
        self.upstream_unmatched_replies
            .with_label_values(&[reason])
            .inc();
    }

    pub(crate) fn drop_packet(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }
}

/// A bounded label for a query type: common types by name, everything else "other".
pub(crate) fn qtype_label(t: RecordType) -> &'static str {
    QTYPE_LABELS[qtype_index(t)]
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if encoder.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// What the HTTP endpoint serves.
pub(crate) struct Endpoint {
    pub(crate) registry: Registry,
    /// Updates gauges that are computed at scrape time.
    pub(crate) refresh: Arc<dyn Fn() + Send + Sync>,
    /// `/ready`: Ok once listeners are up and the Consul source has data; the reason otherwise.
    pub(crate) ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// `/health`: true while serving DNS (false once shutdown began).
    pub(crate) live: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The debug routes (`/`, `/explain`), or their refusals.
    pub(crate) debug: axum::Router,
}

/// Serves `/metrics`, `/health`, `/ready` and the debug routes on an already-bound listener
/// until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let Endpoint {
        registry,
        refresh,
        ready,
        live,
        debug,
    } = endpoint;
    let app = debug
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                let refresh = refresh.clone();
                async move {
                    refresh();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        render(&registry),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let live = live.clone();
                async move {
                    if live() {
                        (StatusCode::OK, "ok\n".to_owned())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n".to_owned(),
                        )
                    }
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {reason}\n"),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The conventional mnemonic of an rcode (as dig prints it), for labels and logs.
pub(crate) fn rcode_label(rcode: ResponseCode) -> &'static str {
    use hickory_proto::op::ResponseCode as R;
    match rcode {
        R::NoError => "NOERROR",
        R::FormErr => "FORMERR",
        R::ServFail => "SERVFAIL",
        R::NXDomain => "NXDOMAIN",
        R::NotImp => "NOTIMP",
        R::Refused => "REFUSED",
        R::BADVERS => "BADVERS",
        _ => "other",
    }
}
