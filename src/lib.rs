//! consul-dns-forwarder: a DNS server for every application host. Names under the Consul domains
//! are answered from Consul's HTTP health API (kept fresh by blocking queries), from a catalog
//! file, or by forwarding to the agents' DNS port; every other name is forwarded to upstream
//! resolvers and cached.
//!
//! # Layout
//! - [`config`]: the TOML file and command-line flags, validated once into typed values.
//! - [`server`]: sockets: binding (SO_REUSEPORT per core), UDP receive loops, TCP connections
//!   (RFC 7766), draining on shutdown.
//! - `datagrams`: UDP datagrams read and replies sent, one at a time or in batches (`recvmmsg`,
//!   `sendmmsg`), and how many per read (`ReadSize`).
//! - [`answer`]: the contract between the handler and the answer sources: `Question`,
//!   `Answer`, `Source` and the `AnswerSource` trait.
//! - [`handler`]: one request's bytes in, one reply's bytes out: protocol checks, access control,
//!   routing to an answer source, size limits.
//! - `arpa`: reverse names (`in-addr.arpa.`, `ip6.arpa.`) read as addresses, without
//!   allocating, for the PTR answers of the Consul source.
//! - `atomic_instant`: an `Instant` read and written without a lock (the watch times every
//!   Consul answer checks).
//! - `header`: the 12-byte DNS header (named flags, section counts), record type numbers and
//!   the reply size limits.
//! - [`reply`]: pure DNS message functions: reply headers, encoding within a size, truncation.
//! - [`consul`]: the Consul answer source: name parsing and validation, what exists in Consul,
//!   health filtering, record building, watchers with blocking queries, the change feed (with
//!   the catalog lists it vouches for views without a blocking query: `consul::freshness`), the
//!   catalog file and the dnsmasq-compatible DNS mode; service addresses kept as wire records
//!   for the hot path (`consul::encoded`).
//! - [`upstream`]: forwarding to upstream resolvers with failover and TCP fallback, zone routing,
//!   and the cache in front of it.
//! - `socket_pool`: upstream UDP sockets on random ports, each reused for a few questions.
//! - `upstream_wire`: which upstream replies are plain answers, stored as they came, unparsed.
//! - [`ratelimit`]: per-client-network UDP response rate limiting (TC=1 over the limit).
//! - [`cache`]: the answer cache, in wire format: TTL countdown, negative caching, serve-stale,
//!   merged misses, one entry for DNSSEC and plain clients.
//! - `dnssec`: which DNSSEC records a client without DO must not get (RFC 4035 §3.2.1), and the
//!   forwarder's DNSSEC rules.
//! - [`failures`]: upstream failures remembered per question, with backoff (RFC 9520).
//! - [`raw`]: the cache-hit hot path in bytes: plain queries read without a full parse, replies
//!   written from cached wire bytes with ID, case, TTLs and order patched.
//! - `recent`: each upstream server's last attempts within a minute (status page), and the
//!   exchange an answer came from (kept with its cache entry, for `explain`).
//! - `lock`: the one way to take a mutex (poisoning ignored).
//! - [`logging`]: log lines on stderr, text or JSON, one line per event, colour only on a
//!   terminal (`NO_COLOR` honoured).
//! - [`token_bucket`]: the one token bucket behind every rate (client networks, watchers,
//!   unchecked Consul lookups).
//! - [`metrics`]: Prometheus series registered into a caller-owned registry, and their endpoint.
//! - [`systemd`]: the notify protocol (READY, STATUS, WATCHDOG, STOPPING) and sockets passed by
//!   socket activation, checked against `server.listen`.
//! - [`explain`]: why a name is answered as it is (`consul-dns-forwarder explain`, `/explain`)
//!   and the status page (`/`): a pure verdict per instance, the pages, the CLI's client.
//!
//! See ARCHITECTURE.md for the flow of a query.
//!
//! # Public API
//! Everything is `pub(crate)` unless someone outside the library needs it (the lint
//! `unreachable_pub` holds the line):
//! - the binary: [`run`], [`run_with_reload`], [`run_service`], [`Bound`], [`Reload`], [`config`],
//!   [`server::bind`], [`systemd`], [`logging`], [`metrics::Metrics`], and the `explain`
//!   command's client ([`explain::client`]) with the [`explain::Explanation`] it prints;
//! - the answer contract, for other sources: [`answer`];
//! - the parts the integration tests and benchmarks drive without sockets: the
//!   [`handler::Handler`] and its routes, [`upstream::Forwarder`], the [`cache`] and the
//!   [`raw`] hot path, the [`ratelimit`] and its [`token_bucket`], [`reply::encode_reply`], and the Consul record
//!   builder and catalog types ([`consul::records`], [`consul::catalog`], [`consul::addrs`],
//!   [`consul::file`]), and the PTR address index ([`consul::ptr`], measured by
//!   `benches/ptr_memory.rs`).
//!
//! Their fields and helpers stay crate-private: a test needing more goes through one of these
//! doors or becomes a unit test beside the code.

#![forbid(unsafe_code)]
// Items are `pub(crate)` unless the public API above needs them: the compiler says where a `pub`
// reaches nobody outside.
#![warn(unreachable_pub)]

pub mod answer;
mod arpa;
mod atomic_instant;
pub mod cache;
pub mod config;
pub mod consul;
mod datagrams;
mod dnssec;
pub mod explain;
pub mod failures;
pub mod handler;
mod header;
mod lock;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod raw;
mod recent;
pub mod reply;
pub mod server;
mod socket_pool;
pub mod systemd;
pub mod token_bucket;
pub mod upstream;
mod upstream_wire;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::handler::{ConsulRoute, Handler, Routes};
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::server::{Limits, Listeners};
use crate::systemd::Notifier;
use crate::upstream::Forwarder;

/// How long a scrape in progress may delay the end of `run`.
const ENDPOINT_STOP: Duration = Duration::from_secs(2);

/// Margin on top of the upstream timeout when draining queries at shutdown.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// A reload reads a few files and starts tasks; it never waits on the network. Far above what
/// that takes, so only a bug trips it, and the next SIGHUP is not stuck behind a hung one.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Config reloads: each message on `trigger` (SIGHUP in `main`) calls `load`, which reads and
/// validates the config again. A config that fails to load or build, or a reload that panics,
/// leaves the running one as it is; the outcome is logged and counted, and the next trigger is
/// served as usual.
pub struct Reload {
    pub trigger: mpsc::Receiver<()>,
    pub load: Box<dyn Fn() -> Result<Config, String> + Send + Sync>,
}

/// Serves DNS on the given sockets until `shutdown` resolves, then drains queries in flight and
/// returns. `registry` receives every metric (the caller owns it, so tests can read it).
pub async fn run(
    config: Config,
    bound: Bound,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_reload(config, bound, registry, shutdown, None).await
}

/// One generation of the running configuration: what a reload replaces whole (reusing the
/// forwarder and the Consul source where their settings did not change).
#[derive(Clone)]
struct Generation {
    routes: Routes,
    forwarder: Arc<Forwarder>,
    /// Stops the Consul watchers of these routes when they are replaced.
    consul_stop: CancellationToken,
    /// True when the Consul source was carried over from the previous routes.
    reused_consul: bool,
}

/// Builds routes for `config`, reusing the forwarder (and its cache) and the Consul source of
/// `previous` where their settings did not change, so a reload does not empty the cache or
/// restart watchers needlessly.
async fn build(
    config: &Config,
    previous: Option<(&Config, &Generation)>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Generation, RunError> {
    let forwarder = match previous {
        Some((old, built))
            if old.upstream == config.upstream
                && old.forward == config.forward
                && old.cache == config.cache =>
        {
            built.forwarder.clone()
        }
        _ => Arc::new(Forwarder::from_config(config, metrics)),
    };
    let reuse_consul = match previous {
        Some((old, built)) => {
            old.consul == config.consul
                && config.consul.catalog_file.is_none()
                && old.upstream == config.upstream
                && Arc::ptr_eq(&built.forwarder, &forwarder)
        }
        None => false,
    };
    let (consul, consul_stop) = match previous {
        Some((_, built)) if reuse_consul => {
            (built.routes.consul.clone(), built.consul_stop.clone())
        }
        _ if config.consul.enabled => {
            let stop = shutdown.child_token();
            let source =
                consul::build(config, metrics.clone(), forwarder.clone(), stop.clone()).await?;
            (
                Some(ConsulRoute::new(config.consul.domains.clone(), source)),
                stop,
            )
        }
        _ => (None, shutdown.child_token()),
    };
    Ok(Generation {
        routes: Routes {
            allow: config.server.allow.clone(),
            consul,
            forwarder: forwarder.clone(),
            log_queries: config.log_queries,
            rate_limit: ratelimit::RateLimiter::new(
                config.server.effective_rate_limit(),
                config.server.rate_limit_exempt.clone(),
            )
            .map(Arc::new),
        },
        forwarder,
        consul_stop,
        reused_consul: reuse_consul,
    })
}

/// [`run`] with config reloads.
pub async fn run_with_reload(
    config: Config,
    bound: Bound,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<Reload>,
) -> Result<(), RunError> {
    run_service(config, bound, registry, shutdown, reload, Notifier::off()).await
}

/// [`run_with_reload`] telling the service manager through `notify`: READY=1 once the answer
/// sources are built (the sockets are bound before), STATUS= with the Consul state whenever it
/// changes, WATCHDOG=1 while the runtime runs, STOPPING=1 when `shutdown` resolves.
pub async fn run_service(
    config: Config,
    bound: Bound,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<Reload>,
    notify: Notifier,
) -> Result<(), RunError> {
    let metrics = Metrics::new(&registry)?;
    let token = CancellationToken::new();
    let built = build(&config, None, &metrics, &token).await?;
    let handler = Arc::new(Handler::new(built.routes.clone(), metrics.clone()));
    let state = Arc::new(std::sync::Mutex::new((config.clone(), built)));
    // The sockets are already bound: queries arriving from now on wait in the kernel's buffers
    // until the loops start, so we count as serving from here.
    let serving = Arc::new(AtomicBool::new(true));
    let reloads = explain::status::ReloadLog::default();

    let mut endpoint_task = None;
    if let Some(listener) = bound.metrics {
        let gauges = metrics.clone();
        let st = state.clone();
        let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            let entries = lock(&st).1.forwarder.cache().entry_count();
            gauges
                .cache_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
            gauges.refresh_consul_age();
        });
        let st = state.clone();
        let up = serving.clone();
        let ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync> = Arc::new(move || {
            if !up.load(Ordering::SeqCst) {
                return Err("not serving DNS (starting or shutting down)".to_owned());
            }
            let consul = lock(&st).1.routes.consul.clone();
            consul.map_or(Ok(()), |c| c.ready())
        });
        let live = serving.clone();
        let stop = token.clone();
        let debug = debug_routes(&config, &listener, &state, &handler, &metrics, &reloads);
        endpoint_task = Some(tokio::spawn(async move {
            let endpoint = metrics::Endpoint {
                registry,
                refresh,
                ready,
                live: Arc::new(move || live.load(Ordering::SeqCst)),
                debug,
            };
            if let Err(e) =
                metrics::serve(listener, endpoint, async move { stop.cancelled().await }).await
            {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        }));
    }

    if let Some(reload) = reload {
        tokio::spawn(reload_loop(
            reload,
            state.clone(),
            handler.clone(),
            metrics.clone(),
            token.clone(),
            reloads,
        ));
    }

    notify.serving();
    if notify.enabled() {
        tokio::spawn(tell_systemd(notify.clone(), state.clone(), token.clone()));
    }
    tokio::spawn(stop_on(shutdown, serving.clone(), notify, token.clone()));

    server::serve(
        bound.dns,
        handler,
        metrics,
        Limits {
            max_inflight: config.server.max_inflight,
            max_tcp_connections: config.server.max_tcp_connections,
            max_tcp_connections_per_network: config.server.max_tcp_connections_per_network,
            tcp_idle_timeout: config.server.tcp_idle_timeout,
            drain: config.upstream.timeout + DRAIN_MARGIN,
        },
        token.clone(),
    )
    .await;
    serving.store(false, Ordering::SeqCst);
    token.cancel();
    if let Some(task) = endpoint_task {
        // Scrapes in progress finish; nothing of ours keeps running after `run` returns.
        if tokio::time::timeout(ENDPOINT_STOP, task).await.is_err() {
            tracing::warn!("the metrics endpoint did not stop within {ENDPOINT_STOP:?}");
        }
    }
    Ok(())
}

/// Applies a reload for each message on `reload.trigger` until `token` is cancelled. Each
/// attempt's outcome is counted in `config_reloads_total` and logged.
async fn reload_loop(
    reload: Reload,
    state: State,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
    log: explain::status::ReloadLog,
) {
    let mut trigger = reload.trigger;
    let load: Arc<dyn Fn() -> Result<Config, String> + Send + Sync> = Arc::from(reload.load);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            got = trigger.recv() => if got.is_none() { return },
        }
        // Each attempt runs as its own task: a panic anywhere in it (a bug, or a value
        // validation missed) ends that task only, so it is counted as a failure and this
        // loop stays alive for the next SIGHUP.
        let attempt = token.child_token();
        let mut task = tokio::spawn({
            let (load, state, handler, metrics, attempt) = (
                load.clone(),
                state.clone(),
                handler.clone(),
                metrics.clone(),
                attempt.clone(),
            );
            async move {
                let new_config = load()?;
                apply_reload(new_config, &state, &handler, &metrics, &attempt).await
            }
        });
        let outcome = match tokio::time::timeout(RELOAD_TIMEOUT, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(reload_task_error(e)),
            Err(_) => {
                // Nothing is replaced until the build is done, so stopping it midway
                // leaves the running configuration whole.
                task.abort();
                Err(format!(
                    "the reload did not finish within {RELOAD_TIMEOUT:?}"
                ))
            }
        };
        if outcome.is_err() {
            // Stops whatever the failed attempt started (Consul watchers of routes that
            // were never installed).
            attempt.cancel();
        }
        log.record(outcome.clone());
        match outcome {
            Ok(()) => {
                metrics.reloads.with_label_values(&["success"]).inc();
                tracing::info!("configuration reloaded");
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                tracing::error!(error = %e, "configuration not reloaded; the running configuration is unchanged");
            }
        }
    }
}

type State = Arc<std::sync::Mutex<(Config, Generation)>>;

/// When `shutdown` resolves: not ready first (so health checkers stop sending traffic while we
/// drain), STOPPING=1, then the loops stop.
async fn stop_on(
    shutdown: impl Future<Output = ()>,
    live: Arc<AtomicBool>,
    notify: Notifier,
    trigger: CancellationToken,
) {
    shutdown.await;
    live.store(false, Ordering::SeqCst);
    notify.stopping();
    trigger.cancel();
}

/// READY=1 with the first STATUS=, then STATUS= again whenever the Consul state changes, and
/// WATCHDOG=1 at half the allowed interval, until `token` is cancelled. Sent from a task of the
/// runtime that serves DNS, so a runtime that stops making progress stops the pings too.
async fn tell_systemd(notify: Notifier, state: State, token: CancellationToken) {
    let status = || {
        let consul = lock(&state).1.routes.consul.clone();
        systemd::status_text(consul.map(|c| c.ready()))
    };
    let mut last = status();
    notify.ready(&last);
    let every = notify
        .watchdog_every()
        .map_or(systemd::STATUS_POLL, |w| w.min(systemd::STATUS_POLL));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if notify.watchdog_every().is_some() {
            notify.watchdog();
        }
        let now = status();
        if now != last {
            notify.status(&now);
            last = now;
        }
    }
}

/// The debug routes for the endpoint on `listener`: served where the config allows it (a
/// loopback listener, or `metrics.debug = true`), refused with 403 elsewhere.
fn debug_routes(
    config: &Config,
    listener: &tokio::net::TcpListener,
    state: &State,
    handler: &Arc<Handler>,
    metrics: &Arc<Metrics>,
    reloads: &explain::status::ReloadLog,
) -> axum::Router {
    let allowed = listener
        .local_addr()
        .is_ok_and(|addr| config.metrics.debug_pages_on(addr));
    if !allowed {
        return explain::pages::routes(None);
    }
    let (st, metrics) = (state.clone(), metrics.clone());
    let current = Arc::new(move || {
        let guard = lock(&st);
        explain::gather::Current {
            config: guard.0.clone(),
            consul: guard.1.routes.consul.clone(),
            forwarder: guard.1.forwarder.clone(),
            metrics: metrics.clone(),
        }
    });
    explain::pages::routes(Some(Arc::new(explain::pages::DebugPages {
        handler: handler.clone(),
        current,
        reloads: reloads.clone(),
        slots: tokio::sync::Semaphore::new(explain::pages::MAX_CONCURRENT),
    })))
}

/// Why a reload task ended without a result, for the log.
fn reload_task_error(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("the reload was cancelled: {e}");
    }
    let payload = e.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("the reload failed with an internal error (a bug, please report it): {message}")
}

async fn apply_reload(
    new_config: Config,
    state: &State,
    handler: &Handler,
    metrics: &Arc<Metrics>,
    token: &CancellationToken,
) -> Result<(), String> {
    // Build outside the lock (it may read files); the previous parts are shared through Arcs.
    let (old_config, old_parts) = lock(state).clone();
    if new_config.server.listen != old_config.server.listen
        || new_config.metrics != old_config.metrics
        || new_config.server.max_tcp_connections != old_config.server.max_tcp_connections
        || new_config.server.max_tcp_connections_per_network
            != old_config.server.max_tcp_connections_per_network
        || new_config.server.max_inflight != old_config.server.max_inflight
    {
        tracing::warn!("listen addresses, metrics.listen and server limits change only on restart; the rest is applied");
    }
    let built = build(&new_config, Some((&old_config, &old_parts)), metrics, token)
        .await
        .map_err(|e| e.to_string())?;
    let new_routes = built.routes.clone();
    handler.replace_routes(new_routes);
    let replaced_consul = !built.reused_consul;
    {
        let mut guard = lock(state);
        *guard = (new_config, built);
    }
    if replaced_consul {
        old_parts.consul_stop.cancel();
    }
    Ok(())
}
