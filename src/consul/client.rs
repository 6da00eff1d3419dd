//! The HTTP client for Consul's API: agent failover in the configured order, the ACL token,
//! https with a private CA, bounded bodies and timeouts, and a connection budget so that an
//! agent never sees more than `consul.max_connections` connections from us.
//!
//! The budget is kept at two levels:
//! - Connections: each TCP connection to an agent holds a permit of that agent's semaphore
//!   (`consul.max_connections` permits) from before `connect` until the socket is closed and
//!   the agent has closed its side too ([`BudgetConnector`]). This is what makes the bound
//!   strict: hyper's pool starts a new connection whenever none is idle at the instant a request
//!   begins (even if one is about to come back), and a dropped connection is closed by its task
//!   a moment after; neither can now go beyond the budget, they wait for a permit instead.
//! - Requests: blocking watches and on-demand fetches share the same number of request slots
//!   (a quarter kept for fetches), so watches cannot starve first lookups; catalog lists and
//!   change feeds have blocking slots of their own ([`SHARED_BLOCKING_SLOTS`]: a cold start's
//!   watchers would take them all first), and when more of them run than those hold, wait in
//!   line for the others, ahead of watchers ([`ConsulClient::sleep_queued_for_slot`]); and a
//!   request waiting
//!   for a connection always finds one soon: with at most `max_connections` requests in flight,
//!   a request without a connection means some permit is held by a connection that is idle (the
//!   pool hands it over), being returned, or closing.
//!
//! Why hyper-util's client over our own connector rather than a higher-level client: the permit
//! must live as long as the connection, which needs the connection type in our hands
//! (ARCHITECTURE.md, "Decisions", has the measurement). The budgets are per agent
//! (after a failover, idle connections to the old agent must not hold the new agent's permits);
//! the request slots are shared by all agents.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// How long a non-blocking request may take. Consul answers from memory in milliseconds; more
/// than this means it is overloaded or gone, and the next agent is tried.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the liveness probe of the current agent may take. A hung agent (accepting
/// connections but never answering) is otherwise invisible to blocking queries for `wait`.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Extra time a blocking request gets beyond `wait` and Consul's jitter (up to wait/16).
const BLOCKING_MARGIN: Duration = Duration::from_secs(5);

/// How long a blocking request with `wait` may take before it counts as failed.
pub(crate) fn blocking_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + BLOCKING_MARGIN
}

/// The largest body we read: a 5,000-instance service is about 10 MiB of JSON; more than this is
/// not a health listing (or it never ends).
pub(crate) const MAX_BODY: usize = 64 * 1024 * 1024;

/// Part of the connection budget kept for on-demand fetches (first lookups, nodes, prepared
/// queries), so blocking watches can never starve them.
fn fetch_share(max_connections: usize) -> usize {
    (max_connections / 4).max(1)
}

/// Blocking slots kept for the catalog lists and the change feeds, out of the blocking share:
/// the local datacenter's two lists (services, nodes) and two feeds (critical, warning). They
/// keep every view of the datacenter fresh, a watcher only its own; and a cold start, which
/// asks thousands of services at once, had the watchers take every slot before the lists' and
/// feeds' second request, so these polled: at 100,000 nodes the node list is 25 MB a poll, and
/// issue 8's many-services benchmark peaked at 120-130 MiB in most runs instead of 68
/// (docs/benchmarks.md, "Step ten").
pub(crate) const SHARED_BLOCKING_SLOTS: usize = 4;

/// How many of `blocking_slots` are kept for lists and feeds: [`SHARED_BLOCKING_SLOTS`], less
/// when the budget is tiny, so that one is always left for a watcher.
fn shared_share(blocking_slots: usize) -> usize {
    SHARED_BLOCKING_SLOTS.min(blocking_slots.saturating_sub(1))
}

/// How long a new connection may wait for a permit of the agent's budget. Normally a permit or
/// an idle connection comes within a round trip (see the module doc); hyper also keeps a connect
/// going in the background when an idle connection came first, and this bounds how long (and so
/// how many of) those wait.
const PERMIT_WAIT: Duration = REQUEST_TIMEOUT;

/// How long a closing connection waits for the agent to close its side after ours. Its permit
/// is released only then, so the agent never counts a connection we already reopened; an agent
/// that does not close in this time gets a reset.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Idle pooled connections are closed after this. They hold permits but any request to their
/// agent reuses them, so this only trims the pool after a burst (the usual default of HTTP client pools).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type HttpsClient =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<BudgetConnector>, Empty<Bytes>>;

#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("{agent}: {message}")]
    Transport { agent: String, message: String },
    #[error("{agent}: HTTP {status}: {body}")]
    Status {
        agent: String,
        status: u16,
        body: String,
    },
    #[error("{agent}: unexpected response body: {message}")]
    Decode { agent: String, message: String },
    #[error("no such datacenter")]
    NoSuchDatacenter,
    #[error("not found")]
    NotFound,
    #[error("shutting down")]
    Closed,
}

/// The index for the next blocking query after one that returned `returned`, by Consul's
/// rules: an index that went backwards (a snapshot restore) resets to 0, and one below 1 (a
/// Consul bug on some versions) counts as 1, so the loop never spins.
pub(crate) fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

/// A decoded response and its `X-Consul-Index`.
pub(crate) struct Indexed<T> {
    pub(crate) value: T,
    pub(crate) index: u64,
    /// `X-Consul-LastContact`: how long ago the answering server last heard from the leader
    /// (0 from the leader itself).
    pub(crate) last_contact: Duration,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not read every item, so a list
    /// is not the whole catalog.
    pub(crate) filtered: bool,
}

/// How reads are spread over the Consul servers: Consul's DNS options `allow_stale` and
/// `max_stale`, applied to every request (watches, feeds, lists and fetches alike).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadConsistency {
    pub(crate) allow_stale: bool,
    pub(crate) max_stale: Duration,
}

pub(crate) struct ConsulClient {
    http: HttpsClient,
    consistency: ReadConsistency,
    agents: Vec<url::Url>,
    /// The agent that answered last; requests start there.
    current: AtomicUsize,
    /// Some agent has answered a request since the start (readiness).
    answered: AtomicBool,
    token: Option<String>,
    /// Watchers' blocking slots; short requests borrow idle ones.
    blocking: Arc<Semaphore>,
    /// Lists' and feeds' blocking slots ([`SHARED_BLOCKING_SLOTS`]).
    shared_blocking: Arc<Semaphore>,
    fetches: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// The connector's per-agent budgets, read by the status page; and their size.
    budgets: Arc<Vec<(String, Arc<Semaphore>)>>,
    max_connections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("consul.ca_file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("cannot build the Consul HTTP client: {0}")]
    Build(String),
}

impl ConsulClient {
    pub(crate) fn new(
        agents: Vec<url::Url>,
        token: Option<String>,
        ca_pem: Option<(&str, Vec<u8>)>,
        max_connections: usize,
        consistency: ReadConsistency,
        metrics: Arc<Metrics>,
    ) -> Result<ConsulClient, ClientBuildError> {
        // rustls is built without a default provider (ring builds quickly and needs no cmake);
        // install ring once. A second install fails harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = tls_config(ca_pem)?;
        // A budget beyond what a semaphore can count (2^61) is unlimited in practice.
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        // One budget per agent: after a failover, idle connections to the old agent must not
        // hold permits the new agent's requests wait for.
        let budgets: Arc<Vec<_>> = Arc::new(
            agents
                .iter()
                .map(|a| (authority(a), Arc::new(Semaphore::new(max_connections))))
                .collect(),
        );
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(BudgetConnector {
                tcp,
                budgets: budgets.clone(),
            });
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_connections)
            .build(connector);
        let fetch = fetch_share(max_connections);
        let blocking_slots = max_connections.saturating_sub(fetch).max(1);
        let shared = shared_share(blocking_slots);
        Ok(ConsulClient {
            http,
            consistency,
            agents,
            current: AtomicUsize::new(0),
            answered: AtomicBool::new(false),
            token,
            blocking: Arc::new(Semaphore::new(blocking_slots - shared)),
            shared_blocking: Arc::new(Semaphore::new(shared)),
            fetches: Arc::new(Semaphore::new(fetch)),
            metrics,
            budgets,
            max_connections,
        })
    }

    /// The agent requests go to now (the one that answered last), without credentials.
    pub(crate) fn current_agent(&self) -> String {
        let i = self.current.load(Ordering::Relaxed) % self.agents.len().max(1);
        self.agents.get(i).map_or_else(String::new, authority)
    }

    /// Each agent (`host:port`) with the connections of its budget in use, and the budget.
    pub(crate) fn budgets_in_use(&self) -> Vec<(String, usize, usize)> {
        self.budgets
            .iter()
            .map(|(agent, budget)| {
                let free = budget.available_permits();
                (
                    agent.clone(),
                    self.max_connections.saturating_sub(free),
                    self.max_connections,
                )
            })
            .collect()
    }

    /// Has any agent answered a request yet?
    pub(crate) fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// A slot for a service watcher's blocking query, if one is free.
    pub(crate) fn try_blocking_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.blocking.clone().try_acquire_owned().ok()
    }

    /// A slot for a catalog list's or a change feed's blocking query, if one is free: one of
    /// theirs ([`SHARED_BLOCKING_SLOTS`]), else a watcher's.
    pub(crate) fn try_shared_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.shared_blocking
            .clone()
            .try_acquire_owned()
            .or_else(|_| self.blocking.clone().try_acquire_owned())
            .ok()
    }

    /// Sleeps `pause`; when `queue`, meanwhile waits in line for a blocking slot and returns it
    /// if one came. The catalog lists and the change feeds poll this way when every slot is
    /// taken: they keep every view of a datacenter fresh, a watcher only its own. The
    /// semaphore is fair, so the next slot a watcher or a short request gives back goes to
    /// them, while watchers and short requests only ever take a free one.
    pub(crate) async fn sleep_queued_for_slot(
        &self,
        pause: Duration,
        queue: bool,
    ) -> Option<OwnedSemaphorePermit> {
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        let mut slot = None;
        if queue {
            tokio::select! {
                _ = &mut sleep => return None,
                permit = self.shared_blocking.clone().acquire_owned() => slot = permit.ok(),
                permit = self.blocking.clone().acquire_owned() => slot = permit.ok(),
            }
        }
        sleep.await;
        slot
    }

    /// GET the path made of `segments` with `query`, trying each agent in order from the last
    /// good one. Each segment is percent-encoded as one path segment and each query value as a
    /// value, so no name (even one that escaped validation) can add a segment, a parameter or a
    /// fragment to the request that carries the token. `blocking`
    /// = `Some((index, wait))` makes it a blocking query, which must hold a slot from
    /// [`ConsulClient::try_blocking_slot`]; otherwise a fetch slot is taken here.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        segments: &[&str],
        query: &[(&str, String)],
        blocking: Option<(u64, Duration)>,
    ) -> Result<Indexed<Option<T>>, ClientError> {
        self.get_within(endpoint, segments, query, blocking, REQUEST_TIMEOUT)
            .await
    }

    /// [`ConsulClient::get`], a non-blocking request being given `plain_timeout` rather than
    /// [`REQUEST_TIMEOUT`] (a large list takes longer to send).
    pub(crate) async fn get_within<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        segments: &[&str],
        query: &[(&str, String)],
        blocking: Option<(u64, Duration)>,
        plain_timeout: Duration,
    ) -> Result<Indexed<Option<T>>, ClientError> {
        let _fetch_slot = match blocking {
            Some(_) => None,
            // A short request may borrow an idle watch slot (a cold start has thousands of first
            // fetches and no watches yet); otherwise it waits for a fetch slot.
            None => Some(match self.fetches.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => match self.blocking.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => self
                        .fetches
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| ClientError::Closed)?,
                },
            }),
        };
        let mut params: Vec<(&str, String)> = query.to_vec();
        if self.consistency.allow_stale {
            params.push(("stale", String::new()));
        }
        let timeout = match blocking {
            Some((index, wait)) => {
                params.push(("index", index.to_string()));
                params.push(("wait", format!("{}ms", wait.as_millis())));
                blocking_timeout(wait)
            }
            None => plain_timeout,
        };
        let n = self.agents.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = ClientError::Closed;
        for k in 0..n {
            let i = (start + k) % n;
            match self
                .get_consistent(i, endpoint, segments, query, &params, timeout)
                .await
            {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    self.answered.store(true, Ordering::Relaxed);
                    self.metrics
                        .consul_requests
                        .with_label_values(&[endpoint, "ok"])
                        .inc();
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    self.metrics
                        .consul_last_contact
                        .set(i64::try_from(now).unwrap_or(i64::MAX));
                    return Ok(r);
                }
                // Answers that are final whichever agent gives them.
                Err(e @ (ClientError::NoSuchDatacenter | ClientError::NotFound)) => {
                    self.current.store(i, Ordering::Relaxed);
                    self.metrics
                        .consul_requests
                        .with_label_values(&[endpoint, "not_found"])
                        .inc();
                    return Err(e);
                }
                Err(e) => {
                    self.metrics
                        .consul_requests
                        .with_label_values(&[endpoint, "error"])
                        .inc();
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Checks that the current agent answers (`/v1/status/leader` within [`PROBE_TIMEOUT`]).
    /// `None` when no connection of the budget is free right now (then there is traffic, which
    /// shows the agent's health anyway).
    pub(crate) async fn probe_current(&self) -> Option<Result<(), ClientError>> {
        let _slot = self.fetches.clone().try_acquire_owned().ok()?;
        let i = self.current.load(Ordering::Relaxed) % self.agents.len().max(1);
        let r = self
            .get_from::<serde_json::Value>(i, &["v1", "status", "leader"], &[], PROBE_TIMEOUT)
            .await
            .map(|_| ());
        self.metrics
            .consul_requests
            .with_label_values(&["status_leader", if r.is_ok() { "ok" } else { "error" }])
            .inc();
        Some(r)
    }

    /// Moves to the next agent (after the current one failed its probe). Returns false when there
    /// is no other agent.
    pub(crate) fn fail_over(&self) -> bool {
        let n = self.agents.len();
        if n < 2 {
            return false;
        }
        let next = (self.current.load(Ordering::Relaxed) + 1) % n;
        self.current.store(next, Ordering::Relaxed);
        tracing::warn!(agent = %self.agents[next], "Consul agent not answering: failing over");
        true
    }

    /// `get_from`, then, when a stale read came from a server too far behind the leader
    /// (`max_stale`), the same read again without `stale` (and without blocking: the leader's
    /// answer is wanted now), as Consul's DNS interface does.
    async fn get_consistent<T: DeserializeOwned>(
        &self,
        agent: usize,
        endpoint: &'static str,
        segments: &[&str],
        query: &[(&str, String)],
        params: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Indexed<Option<T>>, ClientError> {
        let r = self.get_from(agent, segments, params, timeout).await?;
        if !self.consistency.allow_stale || r.last_contact <= self.consistency.max_stale {
            return Ok(r);
        }
        self.metrics
            .consul_requests
            .with_label_values(&[endpoint, "too_stale"])
            .inc();
        self.get_from(agent, segments, query, REQUEST_TIMEOUT).await
    }

    async fn get_from<T: DeserializeOwned>(
        &self,
        agent: usize,
        segments: &[&str],
        params: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Indexed<Option<T>>, ClientError> {
        let base = &self.agents[agent];
        let agent_name = base.as_str().trim_end_matches('/').to_owned();
        let transport = |message: String| ClientError::Transport {
            agent: agent_name.clone(),
            message,
        };
        let url = api_url(base, segments, params)
            .ok_or_else(|| transport(format!("refused to build a request for {segments:?}")))?;
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|e| transport(format!("bad request URL: {e}")))?;
        let mut request = hyper::Request::get(uri).header(
            hyper::header::USER_AGENT,
            concat!("consul-dns-forwarder/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| transport(format!("bad request: {e}")))?;
        // The whole exchange, body included, is bounded; dropping it on timeout drops the
        // connection too (hyper closes one whose response was not read to the end).
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| transport(describe(&e)))?;
            let (parts, body) = response.into_parts();
            let expected = parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let body = read_body(body, expected).await.map_err(transport)?;
            Ok::<_, ClientError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| transport("timed out".into()))??;
        let status = parts.status;
        let index = parts
            .headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let last_contact = parts
            .headers
            .get("X-Consul-LastContact")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        let filtered = parts
            .headers
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned();
            if text.contains("No path to datacenter") {
                return Err(ClientError::NoSuchDatacenter);
            }
            if status == hyper::StatusCode::NOT_FOUND {
                return Err(ClientError::NotFound);
            }
            return Err(ClientError::Status {
                agent: agent_name,
                status: status.as_u16(),
                body: text,
            });
        }
        let value: Option<T> = serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            agent: agent_name.clone(),
            message: e.to_string(),
        })?;
        Ok(Indexed {
            value,
            index,
            last_contact,
            filtered,
        })
    }
}

/// `base` (an agent's URL, perhaps with a path prefix) with `segments` appended, each encoded as
/// one path segment (`/`, `?`, `#`, `%`, `\\` and the rest percent-encoded), and `params` as an
/// encoded query string. `None` for a segment that is empty, `.` or `..` (the url crate drops
/// the last two, which would turn one endpoint into another; names are validated before they
/// get here, this keeps the client safe on its own), or a base that cannot have a path.
pub(crate) fn api_url(
    base: &url::Url,
    segments: &[&str],
    params: &[(&str, String)],
) -> Option<url::Url> {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut path = url.path_segments_mut().ok()?;
        path.pop_if_empty();
        for segment in segments {
            if matches!(*segment, "" | "." | "..") {
                return None;
            }
            path.push(segment);
        }
    }
    if !params.is_empty() {
        url.query_pairs_mut().extend_pairs(params);
    }
    Some(url)
}

/// Reads a response body whole, at most `MAX_BODY` bytes. Each chunk is copied into one buffer
/// as it arrives and let go: a large body (the node list of 100,000 nodes is 25 MB) is then held
/// once, where collecting the chunks and joining them held it twice at the join (52 MB of
/// heap at the many-services benchmark's start). A body that comes in one chunk, as most do,
/// is kept as it came. `expected`: the `Content-Length`, 0 when unknown (a hint only). The
/// error is the transport error's message.
async fn read_body(body: hyper::body::Incoming, expected: usize) -> Result<Bytes, String> {
    let mut body = Limited::new(body, MAX_BODY);
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("response larger than {MAX_BODY} bytes")
            } else {
                format!("request failed: {}", chain(e.as_ref()))
            }
        })?;
        // Trailers carry nothing a response of Consul's needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Some(previous) = first.take() {
            let room = expected.max(previous.len() + data.len()).min(MAX_BODY);
            joined.reserve(room);
            joined.extend_from_slice(&previous);
            joined.extend_from_slice(&data);
        } else if joined.is_empty() {
            first = Some(data);
        } else {
            joined.extend_from_slice(&data);
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(joined)))
}

/// hyper's errors, with the cause chain (its own message alone is often just "client error").
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let what = if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{what}: {}", chain(cause)),
        None => format!("{what}: {e}"),
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The TLS settings for https agents: only the CA bundle of `consul.ca_file` when set (a
/// private CA, as Consul deployments usually have), else the system's roots.
fn tls_config(ca_pem: Option<(&str, Vec<u8>)>) -> Result<rustls::ClientConfig, ClientBuildError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let Some((path, pem)) = ca_pem else {
        return <rustls::ClientConfig as rustls_platform_verifier::ConfigVerifierExt>::with_platform_verifier()
            .map_err(|e| ClientBuildError::Build(format!("system CA roots: {e}")));
    };
    let ca_error = |message: String| ClientBuildError::Ca {
        path: path.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ca_error(format!("not a PEM certificate bundle ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| ca_error(format!("unusable CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(ca_error("no certificate found in the file".into()));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `host:port` of an agent or a request, the key of the per-agent budgets.
fn authority(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    normal_authority(host, port)
}

fn uri_authority(uri: &Uri) -> String {
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    normal_authority(uri.host().unwrap_or_default(), port)
}

fn normal_authority(host: &str, port: u16) -> String {
    format!(
        "{}:{port}",
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    )
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's TCP connector behind the per-agent connection budgets: a connection is made only
/// with a permit of its agent's semaphore, and the permit lives in the connection
/// ([`BudgetedIo`]) until it is closed at both ends.
#[derive(Clone)]
struct BudgetConnector {
    tcp: HttpConnector,
    budgets: Arc<Vec<(String, Arc<Semaphore>)>>,
}

impl tower_service::Service<Uri> for BudgetConnector {
    type Response = BudgetedIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<BudgetedIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let key = uri_authority(&dst);
        let budget = self
            .budgets
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, b)| b.clone());
        let mut tcp = self.tcp.clone();
        Box::pin(async move {
            // Only configured agents are asked; anything else has no budget and is refused.
            let budget = budget.ok_or_else(|| format!("{key} is not a configured agent"))?;
            let permit = tokio::time::timeout(PERMIT_WAIT, budget.acquire_owned())
                .await
                .map_err(|_| "every connection of the budget stayed busy")?
                .map_err(|_| "shutting down")?;
            // The connect runs in a task of its own: if the request is dropped mid-connect
            // (its timeout), the agent may already have accepted the socket, so it must still
            // end up in a BudgetedIo and be closed gracefully before the permit goes.
            let connect = tokio::spawn(async move {
                let io = tcp.call(dst).await?;
                Ok::<_, BoxError>(BudgetedIo {
                    io: Some(io),
                    permit: Some(permit),
                })
            });
            connect.await.map_err(|_| "shutting down")?
        })
    }
}

/// A TCP connection to an agent and its permit. Dropping it (hyper's connection task ends)
/// closes the socket gracefully in a task of its own and only then releases the permit.
struct BudgetedIo {
    io: Option<TokioIo<TcpStream>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl BudgetedIo {
    fn io(&mut self) -> io::Result<Pin<&mut TokioIo<TcpStream>>> {
        match self.io.as_mut() {
            Some(io) => Ok(Pin::new(io)),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

impl hyper::rt::Read for BudgetedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl hyper::rt::Write for BudgetedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Connection for BudgetedIo {
    fn connected(&self) -> Connected {
        match &self.io {
            Some(io) => io.connected(),
            None => Connected::new(),
        }
    }
}

impl Drop for BudgetedIo {
    fn drop(&mut self) {
        let (Some(io), Some(permit)) = (self.io.take(), self.permit.take()) else {
            return;
        };
        // Without a runtime (the process is exiting) the socket just closes here.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_then_release(io.into_inner(), permit));
        }
    }
}

/// Closes our side and waits (up to [`CLOSE_LINGER`]) for the agent to close its side before
/// the permit goes. Releasing it at our `close` would let the next connection reach the agent
/// before the agent has noticed the old one closed, so the agent would count one too many.
async fn close_then_release(mut stream: TcpStream, permit: OwnedSemaphorePermit) {
    let closed = tokio::time::timeout(CLOSE_LINGER, async {
        let _ = stream.shutdown().await;
        // Whatever the agent still sends (a late answer) is discarded.
        let mut discard = [0u8; 1024];
        while let Ok(n) = stream.read(&mut discard).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok();
    if !closed {
        // Still open after the linger: reset it, so the agent lets go of it now too. (A zero
        // linger never blocks the thread, unlike the one tokio's deprecation warns about.)
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    drop(stream);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::fetch_share;
    use super::{ConsulClient, ReadConsistency};
    use std::sync::Arc;
    use std::time::Duration;

    fn client(max_connections: usize) -> Arc<ConsulClient> {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::new(&registry).expect("metrics");
        let agent = url::Url::parse("http://127.0.0.1:8500").expect("url");
        let consistency = ReadConsistency {
            allow_stale: true,
            max_stale: Duration::from_secs(10),
        };
        Arc::new(
            ConsulClient::new(
                vec![agent],
                None,
                None,
                max_connections,
                consistency,
                metrics,
            )
            .expect("client"),
        )
    }

    /// Lists and feeds come before watchers: with every blocking slot taken, one that waits
    /// in line gets the next slot given back, and a watcher looking for a free one finds none.
    #[tokio::test]
    async fn a_slot_given_back_goes_to_the_list_in_line_not_to_a_watcher() {
        let client = client(4);
        // A budget of 4 keeps one for fetches: three blocking slots, two of them for lists
        // and feeds.
        let mut held = vec![
            client.try_blocking_slot(),
            client.try_shared_slot(),
            client.try_shared_slot(),
        ];
        assert!(held.iter().all(Option::is_some));
        assert!(client.try_blocking_slot().is_none());
        assert!(client.try_shared_slot().is_none());
        let in_line = client.clone();
        let list = tokio::spawn(async move {
            in_line
                .sleep_queued_for_slot(Duration::from_millis(300), true)
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The watcher's slot, given back: the list in line takes it.
        held.swap_remove(0);
        assert!(client.try_blocking_slot().is_none(), "a watcher took it");
        assert!(list.await.expect("join").is_some(), "the list got no slot");
        // Not in line: the pause passes and no slot is taken, even when one is free.
        held.pop();
        let started = std::time::Instant::now();
        let pause = Duration::from_millis(100);
        assert!(client.sleep_queued_for_slot(pause, false).await.is_none());
        assert!(started.elapsed() >= pause);
        assert!(client.try_shared_slot().is_some());
    }

    /// A cold start's watchers cannot take the lists' and feeds' slots: with the watchers'
    /// slots all taken, four lists and feeds still get one each; a fifth (another
    /// datacenter's) takes a watcher's when one is free.
    #[tokio::test]
    async fn lists_and_feeds_keep_slots_of_their_own() {
        // 8 connections: 2 for fetches, 6 blocking, 4 of them for lists and feeds.
        let eight = client(8);
        let watchers: Vec<_> = (0..2).map(|_| eight.try_blocking_slot()).collect();
        assert!(watchers.iter().all(Option::is_some));
        assert!(eight.try_blocking_slot().is_none(), "two for watchers");
        let lists: Vec<_> = (0..4).map(|_| eight.try_shared_slot()).collect();
        assert!(lists.iter().all(Option::is_some));
        assert!(eight.try_shared_slot().is_none(), "the budget is kept");
        drop(watchers);
        assert!(
            eight.try_shared_slot().is_some(),
            "a fifth takes a watcher's"
        );
        // (max_connections, watchers' slots, lists' and feeds' slots); 2 is the least allowed.
        for (budget, watchers, shared) in [(2, 1, 0), (4, 1, 2), (8, 2, 4), (32, 20, 4)] {
            let c = client(budget);
            // Held, so that each count is of slots taken at once.
            let w: Vec<_> = (0..budget).map_while(|_| c.try_blocking_slot()).collect();
            let s: Vec<_> = (0..budget).map_while(|_| c.try_shared_slot()).collect();
            assert_eq!((w.len(), s.len()), (watchers, shared), "budget {budget}");
        }
    }

    #[test]
    fn a_request_finds_its_agents_budget() {
        for (agent, request) in [
            (
                "http://127.0.0.1:8500",
                "http://127.0.0.1:8500/v1/health/service/web?index=3",
            ),
            (
                "http://Consul.Local",
                "http://consul.local/v1/catalog/node/a",
            ),
            ("https://[::1]:8501/", "https://[::1]:8501/v1/status/leader"),
            ("https://[::1]", "https://[::1]/v1/status/leader"),
        ] {
            let agent = url::Url::parse(agent).expect("url");
            let request: hyper::Uri = request.parse().expect("uri");
            assert_eq!(super::authority(&agent), super::uri_authority(&request));
        }
    }

    #[test]
    fn every_segment_stays_one_segment_and_every_value_one_value() {
        let base = url::Url::parse("http://127.0.0.1:8500/prefix/").expect("url");
        let url = |segments: &[&str], params: &[(&str, String)]| {
            super::api_url(&base, segments, params).map(|u| u.to_string())
        };
        assert_eq!(
            url(&["v1", "health", "service", "web"], &[("dc", "dc2".into())]).as_deref(),
            Some("http://127.0.0.1:8500/prefix/v1/health/service/web?dc=dc2")
        );
        assert_eq!(
            url(
                &["v1", "catalog", "node", "../../kv/secret?raw#x%41\\ a"],
                &[("dc", "x&filter=Service.Meta.s==\"1\"#".into())]
            )
            .as_deref(),
            Some(
                "http://127.0.0.1:8500/prefix/v1/catalog/node/..%2F..%2Fkv%2Fsecret%3Fraw%23x%2541%5C%20a\
                 ?dc=x%26filter%3DService.Meta.s%3D%3D%221%22%23"
            )
        );
        for bad in ["", ".", ".."] {
            assert_eq!(url(&["v1", "catalog", "node", bad], &[]), None);
        }
    }

    #[test]
    fn blocking_indexes_follow_consuls_rules() {
        assert_eq!(super::next_index(0, 7), 7);
        assert_eq!(super::next_index(7, 9), 9);
        assert_eq!(super::next_index(9, 3), 0, "backwards resets");
        assert_eq!(super::next_index(0, 0), 1, "never below 1");
        assert_eq!(super::next_index(5, 5), 5);
    }

    #[test]
    fn budget_split_keeps_both_sides() {
        assert_eq!(fetch_share(32), 8);
        assert_eq!(fetch_share(1), 1);
        assert_eq!(fetch_share(3), 1);
    }
}
