//! The HTTP client for Consul's API: agent failover in the configured order, the ACL token,
//! https with a private CA, bounded bodies and timeouts, and a connection budget split between
//! blocking watches and on-demand fetches so that Consul never sees more than
//! `consul.max_connections` connections from us.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// How long a non-blocking request may take. Consul answers from memory in milliseconds; more
/// than this means it is overloaded or gone, and the next agent is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the liveness probe of the current agent may take. A hung agent (accepting
/// connections but never answering) is otherwise invisible to blocking queries for `wait`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Extra time a blocking request gets beyond `wait` and Consul's jitter (up to wait/16).
const BLOCKING_MARGIN: Duration = Duration::from_secs(5);

/// The largest body we read: a 5,000-instance service is about 10 MiB of JSON; more than this is
/// not a health listing (or it never ends).
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Part of the connection budget kept for on-demand fetches (first lookups, nodes, prepared
/// queries), so blocking watches can never starve them.
fn fetch_share(max_connections: usize) -> usize {
    (max_connections / 4).max(1)
}

/// Part of the budget never used for requests. A connection goes back to reqwest's pool a
/// moment after its request ends (and an aborted request's connection closes a moment after),
/// so a request started in that moment can open one more: the margin keeps even those moments
/// within `consul.max_connections`.
fn pool_margin(max_connections: usize) -> usize {
    (max_connections / 8).max(2)
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
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

/// A decoded response and its `X-Consul-Index`.
pub struct Indexed<T> {
    pub value: T,
    pub index: u64,
}

pub struct ConsulClient {
    http: reqwest::Client,
    agents: Vec<reqwest::Url>,
    /// The agent that answered last; requests start there.
    current: AtomicUsize,
    token: Option<String>,
    blocking: Arc<Semaphore>,
    fetches: Arc<Semaphore>,
    blocking_slots: usize,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("consul.ca_file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("cannot build the Consul HTTP client: {0}")]
    Build(String),
}

impl ConsulClient {
    pub fn new(
        agents: Vec<reqwest::Url>,
        token: Option<String>,
        ca_pem: Option<(&str, Vec<u8>)>,
        max_connections: usize,
        metrics: Arc<Metrics>,
    ) -> Result<ConsulClient, ClientBuildError> {
        // reqwest is built without a default TLS provider (ring builds quickly and needs no
        // cmake); install ring once. A second install fails harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            // Known gap (issue 8): hyper starts a new connection when none is idle at the moment
            // a request begins, even if one is about to be returned, so under heavy churn of
            // short requests (a cold start) Consul can briefly see more connections than
            // requests in flight. `pool_margin` absorbs the usual case; a strict bound needs a
            // pool of our own.
            .pool_max_idle_per_host(max_connections)
            .connect_timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .user_agent(concat!("consul-dns-forwarder/", env!("CARGO_PKG_VERSION")));
        if let Some((path, pem)) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientBuildError::Ca {
                    path: path.to_owned(),
                    message: format!("not a PEM certificate bundle ({e})"),
                })?;
            if certs.is_empty() {
                return Err(ClientBuildError::Ca {
                    path: path.to_owned(),
                    message: "no certificate found in the file".into(),
                });
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ClientBuildError::Build(e.to_string()))?;
        // A budget beyond what a semaphore can count (2^61) is unlimited in practice.
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        let usable = max_connections
            .saturating_sub(pool_margin(max_connections))
            .max(2);
        let fetch = fetch_share(usable);
        let blocking_slots = usable.saturating_sub(fetch).max(1);
        Ok(ConsulClient {
            http,
            agents,
            current: AtomicUsize::new(0),
            token,
            blocking: Arc::new(Semaphore::new(blocking_slots)),
            fetches: Arc::new(Semaphore::new(fetch)),
            blocking_slots,
            metrics,
        })
    }

    /// How many blocking watches can run at once.
    pub fn blocking_slots(&self) -> usize {
        self.blocking_slots
    }

    /// A slot for a long-lived blocking watch, if one is free.
    pub fn try_blocking_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.blocking.clone().try_acquire_owned().ok()
    }

    /// GET `path` with `query`, trying each agent in order from the last good one. `blocking`
    /// = `Some((index, wait))` makes it a blocking query, which must hold a slot from
    /// [`ConsulClient::try_blocking_slot`]; otherwise a fetch slot is taken here.
    pub async fn get<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        blocking: Option<(u64, Duration)>,
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
        let timeout = match blocking {
            Some((index, wait)) => {
                params.push(("index", index.to_string()));
                params.push(("wait", format!("{}ms", wait.as_millis())));
                wait + wait / 16 + BLOCKING_MARGIN
            }
            None => REQUEST_TIMEOUT,
        };
        let n = self.agents.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = ClientError::Closed;
        for k in 0..n {
            let i = (start + k) % n;
            match self.get_from(i, path, &params, timeout).await {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
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
    pub async fn probe_current(&self) -> Option<Result<(), ClientError>> {
        let _slot = self.fetches.clone().try_acquire_owned().ok()?;
        let i = self.current.load(Ordering::Relaxed) % self.agents.len().max(1);
        let r = self
            .get_from::<serde_json::Value>(i, "/v1/status/leader", &[], PROBE_TIMEOUT)
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
    pub fn fail_over(&self) -> bool {
        let n = self.agents.len();
        if n < 2 {
            return false;
        }
        let next = (self.current.load(Ordering::Relaxed) + 1) % n;
        self.current.store(next, Ordering::Relaxed);
        tracing::warn!(agent = %self.agents[next], "Consul agent not answering: failing over");
        true
    }

    async fn get_from<T: DeserializeOwned>(
        &self,
        agent: usize,
        path: &str,
        params: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Indexed<Option<T>>, ClientError> {
        let base = &self.agents[agent];
        let agent_name = base.as_str().trim_end_matches('/').to_owned();
        let transport = |message: String| ClientError::Transport {
            agent: agent_name.clone(),
            message,
        };
        let url = base
            .join(path.trim_start_matches('/'))
            .map_err(|e| transport(format!("bad path {path}: {e}")))?;
        let mut request = self.http.get(url).query(params).timeout(timeout);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let mut response = request.send().await.map_err(|e| transport(describe(&e)))?;
        let status = response.status();
        let index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport(describe(&e)))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(transport(format!("response larger than {MAX_BODY} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned();
            if text.contains("No path to datacenter") {
                return Err(ClientError::NoSuchDatacenter);
            }
            if status == reqwest::StatusCode::NOT_FOUND {
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
        Ok(Indexed { value, index })
    }
}

/// reqwest's errors without the URL's query string (which may carry nothing secret, but keeps
/// logs short), with the cause chain.
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::fetch_share;

    #[test]
    fn margin_is_at_least_one() {
        assert_eq!(super::pool_margin(32), 4);
        assert_eq!(super::pool_margin(4), 2);
    }

    #[test]
    fn budget_split_keeps_both_sides() {
        assert_eq!(fetch_share(32), 8);
        assert_eq!(fetch_share(1), 1);
        assert_eq!(fetch_share(3), 1);
    }
}
