//! consul-dns-forwarder: a DNS server for every application host. Names under the Consul domains
//! are answered from Consul's HTTP health API (kept fresh by blocking queries), from a catalog
//! file, or by forwarding to the agents' DNS port; every other name is forwarded to upstream
//! resolvers and cached.
//!
//! # Layout
//! - [`config`]: the TOML file and command-line flags, validated once into typed values.
//! - [`server`]: sockets: binding (SO_REUSEPORT per core), UDP receive loops, TCP connections
//!   (RFC 7766), draining on shutdown.
//! - [`handler`]: one request's bytes in, one reply's bytes out: protocol checks, access control,
//!   routing to an answer source, size limits.
//! - [`wire`]: pure DNS message functions: reply headers, encoding within a size, truncation.
//! - [`consul`]: the Consul answer source: name parsing, health filtering, record building,
//!   watchers with blocking queries, the catalog file and the dnsmasq-compatible DNS mode.
//! - [`upstream`]: forwarding to upstream resolvers with failover and TCP fallback, zone routing,
//!   and the cache in front of it.
//! - [`cache`]: the answer cache: TTL countdown, negative caching, serve-stale, merged misses.
//! - [`metrics`]: Prometheus series registered into a caller-owned registry, and their endpoint.
//!
//! See ARCHITECTURE.md for the flow of a query.

pub mod cache;
pub mod config;
pub mod consul;
pub mod handler;
pub mod metrics;
pub mod server;
pub mod upstream;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, TtlPolicy};
use crate::config::Config;
use crate::handler::{ConsulRoute, Handler};
use crate::metrics::Metrics;
use crate::server::{Limits, Listeners};
use crate::upstream::{Forwarder, Router, ServerGroup};

/// Margin on top of the upstream timeout when draining queries at shutdown.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Consul(#[from] consul::ConsulError),
}

/// Everything `run` needs that touches the outside world, bound or read beforehand.
pub struct Bound {
    pub dns: Listeners,
    /// The metrics/health endpoint, when enabled.
    pub metrics: Option<tokio::net::TcpListener>,
}

/// Serves DNS on the given sockets until `shutdown` resolves, then drains queries in flight and
/// returns. `registry` receives every metric (the caller owns it, so tests can read it).
pub async fn run(
    config: Config,
    bound: Bound,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Metrics::new(&registry)?;
    let token = CancellationToken::new();

    let forwarder = Arc::new(Forwarder::new(
        Router::new(
            ServerGroup::new(config.upstream.servers.clone(), config.upstream.timeout),
            config
                .forward
                .iter()
                .map(|f| {
                    (
                        f.zone.clone(),
                        ServerGroup::new(f.servers.clone(), config.upstream.timeout),
                    )
                })
                .collect(),
        ),
        Cache::new(
            config.cache.max_entries,
            TtlPolicy {
                min_ttl: config.cache.min_ttl,
                max_ttl: config.cache.max_ttl,
                negative_ttl: config.cache.negative_ttl,
                negative_min_ttl: Duration::ZERO,
                stale_for: config.cache.stale_for,
            },
        ),
        metrics.clone(),
        false,
    ));

    let consul = if config.consul.enabled {
        let source =
            consul::build(&config, metrics.clone(), forwarder.clone(), token.clone()).await?;
        Some(ConsulRoute {
            domains: config.consul.domains.clone(),
            source,
        })
    } else {
        None
    };

    let handler = Arc::new(Handler::new(
        config.server.allow.clone(),
        consul,
        forwarder.clone(),
        metrics.clone(),
        config.log_queries,
    ));

    if let Some(listener) = bound.metrics {
        let cache = forwarder.cache().clone();
        let gauges = metrics.clone();
        let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            gauges
                .cache_entries
                .set(i64::try_from(cache.entry_count()).unwrap_or(i64::MAX));
        });
        let stop = token.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, registry, refresh, async move {
                stop.cancelled().await
            })
            .await
            {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });

    server::serve(
        bound.dns,
        handler,
        metrics,
        Limits {
            max_inflight: config.server.max_inflight,
            max_tcp_connections: config.server.max_tcp_connections,
            tcp_idle_timeout: config.server.tcp_idle_timeout,
            drain: config.upstream.timeout + DRAIN_MARGIN,
        },
        token.clone(),
    )
    .await;
    token.cancel();
    Ok(())
}
