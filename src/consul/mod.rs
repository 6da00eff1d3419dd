//! The Consul answer source. Names under the Consul domains are parsed and checked against
//! Consul's alphabet ([`name`]), checked against what exists (`inventory`, HTTP mode), looked up
//! in a backend (HTTP watchers in `http`, or a catalog file in [`file`](mod@file)), filtered by health and
//! turned into records ([`records`]), shuffled afresh for every response. The dnsmasq-compatible
//! `mode = "dns"` instead forwards the domain to the agents' DNS port through the same cache as
//! upstream names.

pub(crate) mod agent;
pub mod catalog;
pub(crate) mod client;
pub(crate) mod feed;
pub mod file;
pub(crate) mod http;
pub(crate) mod inventory;
pub mod name;
pub(crate) mod on_demand;
pub(crate) mod outage;
pub mod ptr;
pub mod records;
pub(crate) mod retry;
pub(crate) mod views;
pub(crate) mod watcher;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, RecordType};
use tokio_util::sync::CancellationToken;

use self::catalog::{NodeView, QueryView, ServiceView};
use self::name::ConsulName;
use self::ptr::PtrName;
use self::records::{Ctx, Plan};
use crate::answer::{Answer, AnswerSource, Question, Source};
use crate::config::{Config, ConsulConfig, ConsulMode};
use crate::metrics::Metrics;
use crate::upstream::Forwarder;

/// Why a backend could not produce a view.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LookupError {
    /// Consul has not answered (yet, or for longer than `stale_for`): SERVFAIL, never NXDOMAIN.
    #[error("Consul unavailable: {0}")]
    Unavailable(String),
    /// Consul says the datacenter does not exist: NXDOMAIN, as Consul's DNS.
    #[error("no such datacenter")]
    NoSuchDatacenter,
    /// Consul's catalog has no such service: NXDOMAIN, with no request for it.
    #[error("no such name in Consul's catalog")]
    NoSuchName,
}

/// Where Consul data comes from.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The datacenter names without a datacenter label refer to.
    async fn local_datacenter(&self) -> Option<String>;
    /// See [`AnswerSource::ready`]: a catalog file is ready once loaded.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    async fn service(
        &self,
        service: &str,
        dc: Option<&str>,
    ) -> Result<Arc<ServiceView>, LookupError>;
    async fn node(
        &self,
        node: &str,
        dc: Option<&str>,
    ) -> Result<Option<Arc<NodeView>>, LookupError>;
    async fn query(
        &self,
        name: &str,
        dc: Option<&str>,
    ) -> Result<Option<Arc<QueryView>>, LookupError>;
    /// See [`AnswerSource::answers_address`]: `ip` is known, or may be (still loading).
    fn may_know_address(&self, _ip: IpAddr) -> bool {
        false
    }
    /// What the local datacenter calls `ip` (a node, else a service), waiting for a first
    /// load; `None` when Consul does not know it.
    async fn address_name(&self, _ip: IpAddr) -> Option<PtrName> {
        None
    }
}

/// Problems found while setting Consul up, before serving.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error(transparent)]
    Catalog(#[from] file::CatalogError),
    #[error(transparent)]
    Client(#[from] client::ClientBuildError),
    #[error("consul.token_file {path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("consul.ca_file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("consul.http: {0}")]
    InsecureToken(#[from] crate::config::InsecureToken),
}

/// Answers names under the Consul domains from a backend.
pub struct ConsulSource {
    backend: Arc<dyn Backend>,
    config: ConsulConfig,
    /// Resolves hostnames that Consul gives as addresses (CNAME targets): the forwarder.
    resolver: Arc<dyn AnswerSource>,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl ConsulSource {
    pub fn new(
        backend: Arc<dyn Backend>,
        config: &ConsulConfig,
        resolver: Arc<dyn AnswerSource>,
    ) -> ConsulSource {
        ConsulSource {
            backend,
            config: config.clone(),
            resolver,
        }
    }

    async fn answer_inner(&self, q: &Question, limit: usize) -> Answer {
        let cfg = &self.config;
        let Some(parsed) = name::parse(&q.name, q.qtype, &cfg.domains) else {
            return Answer::rcode(ResponseCode::Refused);
        };
        if q.qclass != DNSClass::IN && q.qclass != DNSClass::ANY {
            return Answer::rcode(ResponseCode::Refused);
        }
        let local_dc = self.backend.local_datacenter().await;
        // A name that spells out the local datacenter is the same view as one that does not.
        let norm = |dc: &Option<String>| -> Option<String> {
            match (dc, &local_dc) {
                (Some(d), Some(l)) if d == l => None,
                (d, _) => d.clone(),
            }
        };
        let serial = u32::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(0);
        let mut ctx = Ctx {
            qname: &q.name,
            qtype: q.qtype,
            domain: &parsed.domain,
            dc: local_dc.as_deref().unwrap_or(file::DEFAULT_DATACENTER),
            ttl: secs(cfg.node_ttl),
            negative_ttl: secs(cfg.negative_ttl),
            a_record_limit: cfg.a_record_limit,
            serial,
        };
        let built = match &parsed.name {
            ConsulName::Apex => Plan::Done(records::apex_answer(&ctx)),
            ConsulName::Invalid => Plan::Done(records::nxdomain(&ctx)),
            ConsulName::Addr { ip } => Plan::Done(records::addr_answer(*ip, &ctx)),
            ConsulName::Service { service, tag, dc } => {
                let dc = norm(dc);
                match self.backend.service(service, dc.as_deref()).await {
                    Ok(view) => {
                        ctx.ttl = secs(cfg.service_ttl_for(service));
                        let dc_name = dc.clone().unwrap_or_else(|| ctx.dc.to_owned());
                        self.answer_from_view(&view, tag.as_deref(), q, limit, &ctx, &dc_name)
                    }
                    Err(LookupError::NoSuchDatacenter | LookupError::NoSuchName) => {
                        Plan::Done(records::nxdomain(&ctx))
                    }
                    Err(LookupError::Unavailable(_)) => return Answer::servfail(),
                }
            }
            ConsulName::Node { node, dc } => {
                match self.backend.node(node, norm(dc).as_deref()).await {
                    Ok(node) => records::node_answer(node.as_deref(), &ctx),
                    Err(LookupError::NoSuchDatacenter | LookupError::NoSuchName) => {
                        Plan::Done(records::nxdomain(&ctx))
                    }
                    Err(LookupError::Unavailable(_)) => return Answer::servfail(),
                }
            }
            ConsulName::Query { query, dc } => {
                match self.backend.query(query, norm(dc).as_deref()).await {
                    Ok(Some(qv)) => {
                        ctx.ttl = secs(qv.ttl.unwrap_or_else(|| cfg.service_ttl_for(query)));
                        let dc_name = ctx.dc.to_owned();
                        self.answer_from_view(&qv.service, None, q, limit, &ctx, &dc_name)
                    }
                    Ok(None) | Err(LookupError::NoSuchDatacenter | LookupError::NoSuchName) => {
                        Plan::Done(records::nxdomain(&ctx))
                    }
                    Err(LookupError::Unavailable(_)) => return Answer::servfail(),
                }
            }
        };
        match built {
            Plan::Done(answer) => answer,
            Plan::Cname { mut answer, target } => {
                // The CNAME first, then the target's records, in chain order (glibc ≥ 2.37
                // ignores addresses that do not follow the chain).
                let qtype = if q.qtype == RecordType::ANY {
                    RecordType::A
                } else {
                    q.qtype
                };
                let target = Question {
                    name: target,
                    qtype,
                    qclass: DNSClass::IN,
                };
                let (resolved, _) = self.resolver.answer(&target, limit).await;
                answer.answers.extend(resolved.answers);
                answer
            }
        }
    }
}

impl ConsulSource {
    /// A service view's answer: its selection for `tag`, a random sample of what can fit in
    /// `limit`, records. SRV targets name the view's datacenter when it has one.
    fn answer_from_view(
        &self,
        view: &ServiceView,
        tag: Option<&str>,
        q: &Question,
        limit: usize,
        ctx: &Ctx<'_>,
        dc_fallback: &str,
    ) -> Plan {
        let cfg = &self.config;
        let selection = records::select(view, tag, cfg.only_passing, cfg.when_none_healthy);
        let chosen = records::pick(
            view,
            &selection,
            q.qtype,
            records::record_cap(q.qtype, limit, q.name.len()),
            &mut rand::rng(),
        );
        let dc = if view.datacenter.is_empty() {
            dc_fallback
        } else {
            view.datacenter.as_str()
        };
        records::service_answer(
            &chosen,
            !selection.all.is_empty(),
            &Ctx { dc, ..ctx.clone() },
        )
    }
}

impl ConsulSource {
    /// A PTR (or ANY) question for `ip`, an address the handler found Consul may know: Consul's
    /// answer when it does, else the question forwarded, as Consul's DNS recurses.
    async fn reverse_answer(&self, q: &Question, ip: IpAddr, limit: usize) -> (Answer, Source) {
        let cfg = &self.config;
        if let Some(found) = self.backend.address_name(ip).await {
            let ttl = match &found {
                PtrName::Node(_) => cfg.node_ttl,
                PtrName::Service(service) => cfg.service_ttl_for(service),
            };
            let dc = self.backend.local_datacenter().await;
            let dc = dc.as_deref().unwrap_or(file::DEFAULT_DATACENTER);
            // Consul names its own domain, never an alternative one.
            if let Some(domain) = cfg.domains.first() {
                if let Some(answer) = ptr::answer(q, &found, dc, domain, secs(ttl)) {
                    return (answer, Source::Consul);
                }
            }
        }
        self.resolver.answer(q, limit).await
    }
}

#[async_trait]
impl AnswerSource for ConsulSource {
    async fn answer(&self, q: &Question, limit: usize) -> (Answer, Source) {
        if let Some(ip) = crate::arpa::question_address(q) {
            return self.reverse_answer(q, ip, limit).await;
        }
        (self.answer_inner(q, limit).await, Source::Consul)
    }

    fn ready(&self) -> Result<(), String> {
        self.backend.ready()
    }

    fn answers_address(&self, ip: IpAddr) -> bool {
        self.backend.may_know_address(ip)
    }
}

/// Builds the Consul answer source the config asks for: the demo or a catalog file, the agents'
/// DNS port, or the HTTP API.
pub(crate) async fn build(
    config: &Config,
    metrics: Arc<Metrics>,
    resolver: Arc<dyn AnswerSource>,
    shutdown: CancellationToken,
) -> Result<Arc<dyn AnswerSource>, ConsulError> {
    let c = &config.consul;
    let dc = c.datacenter.as_deref();
    let backend: Arc<dyn Backend> = if c.demo_catalog {
        let demo = file::FileBackend::from_text(file::DEMO_CATALOG, "conf/demo-catalog.json", dc)?;
        Arc::new(demo)
    } else if let Some(path) = &c.catalog_file {
        Arc::new(file::FileBackend::load(path, dc)?)
    } else {
        match c.mode {
            ConsulMode::Dns => return Ok(Arc::new(Forwarder::consul_dns(config, &metrics))),
            ConsulMode::Http => Arc::new(http_backend(c, metrics, shutdown)?),
        }
    };
    Ok(Arc::new(ConsulSource::new(backend, c, resolver)))
}

fn http_backend(
    c: &ConsulConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<http::HttpBackend, ConsulError> {
    // Checked where the token is used, so no caller (a reload, a library user) can skip it.
    c.check_token_transport()?;
    let token = read_token(c)?;
    let ca = match &c.ca_file {
        Some(path) => Some((
            path.display().to_string(),
            std::fs::read(path).map_err(|source| ConsulError::CaFile {
                path: path.display().to_string(),
                source,
            })?,
        )),
        None => None,
    };
    let client = client::ConsulClient::new(
        c.http.clone(),
        token,
        ca.as_ref().map(|(p, pem)| (p.as_str(), pem.clone())),
        c.max_connections,
        client::ReadConsistency {
            allow_stale: c.allow_stale,
            max_stale: c.max_stale,
        },
        metrics.clone(),
    )?;
    Ok(http::HttpBackend::new(client, c, metrics, shutdown))
}

/// The ACL token: `consul.token_file`, else `CONSUL_HTTP_TOKEN`. Never logged. A file that other
/// users can read gets a warning: the token is a credential for the whole Consul cluster.
fn read_token(c: &ConsulConfig) -> Result<Option<String>, ConsulError> {
    if let Some(path) = &c.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| ConsulError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                let mode = meta.permissions().mode();
                let readers = if mode & 0o004 != 0 {
                    Some("every user on this host")
                } else if mode & 0o040 != 0 {
                    Some("its group")
                } else {
                    None
                };
                if let Some(readers) = readers {
                    tracing::warn!(
                        path = %path.display(),
                        mode = %format!("{:o}", mode & 0o777),
                        "consul.token_file is readable by {readers}: chmod 600 it"
                    );
                }
            }
        }
        let token = text.trim().to_owned();
        return Ok((!token.is_empty()).then_some(token));
    }
    Ok(std::env::var(crate::config::TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}
