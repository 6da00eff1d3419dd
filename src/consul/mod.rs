//! The Consul answer source. Names under the Consul domains are parsed and checked against
//! Consul's alphabet ([`name`]), checked against what exists (`inventory`, HTTP mode), looked up
//! in a backend (HTTP watchers in `http`, or a catalog file in [`file`](mod@file)), filtered by health and
//! turned into records ([`records`]), shuffled afresh for every response. The dnsmasq-compatible
//! `mode = "dns"` instead forwards the domain to the agents' DNS port through the same cache as
//! upstream names.

pub mod addrs;
pub(crate) mod agent;
pub mod catalog;
pub(crate) mod client;
pub(crate) mod encoded;
pub(crate) mod feed;
pub mod file;
pub(crate) mod freshness;
pub(crate) mod http;
pub(crate) mod inventory;
pub mod name;
pub(crate) mod on_demand;
pub(crate) mod outage;
pub(crate) mod peek;
pub mod ptr;
pub mod records;
pub(crate) mod retry;
pub(crate) mod views;
pub(crate) mod watcher;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio_util::sync::CancellationToken;

use self::catalog::{NodeView, QueryView, Selection, ServiceView};
use self::encoded::EncodedAnswers;
use self::name::{ConsulName, ServiceKind, Tenancy, ViewKey};
use self::ptr::PtrName;
use self::records::{Ctx, Plan};
use crate::answer::{Answer, AnswerSource, Question, Source};
use crate::config::{Config, ConsulConfig, ConsulMode, WhenNoneHealthy};
use crate::explain::details::DetailEntry;
use crate::explain::gather::{AgentState, KeptView, ViewPeek};
use crate::metrics::Metrics;
use crate::raw::PlainQuery;
use crate::upstream::Forwarder;

/// The service Consul registers for its servers: their nodes are the domain's nameservers.
const CONSUL_SERVICE: &str = "consul";

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
    /// The view of a service lookup (`.service`, `.connect` or `.ingress`, in a datacenter,
    /// peer, namespace and partition).
    async fn service(&self, key: &ViewKey) -> Result<Arc<ServiceView>, LookupError>;
    /// When [`Backend::service`] would return `view` for `key` right now, at once, with nothing
    /// to wait for, wake or fetch: what tells, per query and without looking the view up
    /// again, whether that is still so. `None` otherwise. The hot path serves pre-encoded
    /// answers ([`encoded`]) only while their check passes.
    fn serving(&self, _key: &ViewKey, _view: &Arc<ServiceView>) -> Option<Box<dyn StillServed>> {
        None
    }
    async fn node(
        &self,
        node: &str,
        dc: Option<&str>,
        tenancy: &Tenancy,
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
    /// For `explain`: the view of `key` as kept now, without fetching, watching or waiting;
    /// `Err` says why there is none.
    fn peek_service(&self, _key: &ViewKey) -> Result<ViewPeek, String> {
        Err("this source keeps no views".to_owned())
    }
    /// For `explain`: the checks of `key`'s instances. At most one request, and only for a view
    /// already kept (a name a DNS query made known), never a new watch.
    async fn service_details(&self, _key: &ViewKey) -> Result<Vec<DetailEntry>, String> {
        Err("this source has no check details".to_owned())
    }
    /// For the status page: up to `max` kept views, and how many there are in all.
    fn kept_views(&self, _max: usize) -> (Vec<KeptView>, usize) {
        (Vec::new(), 0)
    }
    /// For the status page: the agents with the connections in use of their budget.
    fn agents(&self) -> Vec<AgentState> {
        Vec::new()
    }
}

/// Whether the view a [`Backend::serving`] check was made for is still what
/// [`Backend::service`] would return at once; asked per query on the hot path, so it must cost
/// no more than a few atomic reads.
pub trait StillServed: Send + Sync {
    /// True when it is, counting the query as `service` does; `now`: the query's arrival (no
    /// clock read here).
    fn still_served(&self, now: Instant) -> bool;
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
    /// Service addresses as wire bytes, for the hot path.
    encoded: EncodedAnswers,
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
            encoded: EncodedAnswers::default(),
        }
    }

    /// Keeps the addresses of a service answer as wire bytes for the hot path, when the view is
    /// one the backend serves as it is (see [`Backend::serving`]).
    fn remember(
        &self,
        view_key: &ViewKey,
        view: &Arc<ServiceView>,
        selection: &Selection,
        ctx: &Ctx<'_>,
    ) {
        if !matches!(ctx.qtype, RecordType::A | RecordType::AAAA) {
            return;
        }
        let Some(check) = self.backend.serving(view_key, view) else {
            return;
        };
        self.encoded.remember(encoded::Answered {
            qname: ctx.qname,
            qtype: ctx.qtype,
            ttl: ctx.ttl,
            view,
            selection,
            check,
        });
    }

    /// Where the views come from, for `explain` and the status page.
    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub(crate) fn config(&self) -> &ConsulConfig {
        &self.config
    }

    async fn answer_inner(&self, q: &Question, limit: usize) -> Answer {
        let cfg = &self.config;
        let Some(name::Parsed { domain, name }) = name::parse(&q.name, q.qtype, &cfg.domains)
        else {
            return Answer::rcode(ResponseCode::Refused);
        };
        if q.qclass != DNSClass::IN && q.qclass != DNSClass::ANY {
            return Answer::rcode(ResponseCode::Refused);
        }
        let local_dc = self.backend.local_datacenter().await;
        let serial = u32::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(0);
        let ctx = Ctx {
            qname: &q.name,
            qtype: q.qtype,
            domain: &domain,
            dc: local_dc.as_deref().unwrap_or(file::DEFAULT_DATACENTER),
            ttl: secs(cfg.node_ttl),
            negative_ttl: secs(cfg.negative_ttl),
            a_record_limit: cfg.a_record_limit,
            serial,
            soa: cfg.soa,
            node_meta_txt: cfg.node_meta_txt,
            peer: None,
            partition: None,
        };
        let built = match q.qtype {
            // Answered for every name in the domain, whatever it names, as Consul does.
            RecordType::SOA | RecordType::NS => self.nameserver_answer(&ctx).await,
            _ => self.lookup(name, &local_dc, limit, ctx).await,
        };
        let mut answer = match built {
            Ok(Plan::Done(answer)) => answer,
            Ok(Plan::Cname { answer, target }) => self.follow_cname(answer, target, q, limit).await,
            Err(failed) => return failed,
        };
        if limit == crate::reply::UDP_LIMIT_NO_EDNS {
            records::limit_answers(&mut answer, cfg.udp_answer_limit);
        }
        answer.cut.silent = !cfg.enable_truncate;
        answer
    }

    /// What a name of each kind answers (before a CNAME is followed); `Err` is the final answer
    /// when Consul cannot be asked. Takes the parsed name: its strings become the view key.
    async fn lookup(
        &self,
        name: ConsulName,
        local_dc: &Option<String>,
        limit: usize,
        mut ctx: Ctx<'_>,
    ) -> Result<Plan, Answer> {
        let cfg = &self.config;
        // A name that spells out the local datacenter is the same view as one that does not.
        let norm = |dc: Option<String>| -> Option<String> {
            match (dc, local_dc) {
                (Some(d), Some(l)) if d == *l => None,
                (d, _) => d,
            }
        };
        let missing = |e: LookupError, ctx: &Ctx<'_>| match e {
            LookupError::NoSuchDatacenter | LookupError::NoSuchName => {
                Ok(Plan::Done(records::nxdomain(ctx)))
            }
            LookupError::Unavailable(_) => Err(Answer::servfail()),
        };
        match name {
            ConsulName::Apex => Ok(Plan::Done(records::apex_answer(&ctx))),
            ConsulName::Invalid => Ok(Plan::Done(records::nxdomain(&ctx))),
            ConsulName::Addr { ip } => Ok(Plan::Done(records::addr_answer(ip, &ctx))),
            ConsulName::Service {
                service,
                tag,
                kind,
                dc,
                tenancy,
            } => {
                let key = ViewKey::new(service, norm(dc), kind, tenancy);
                match self.backend.service(&key).await {
                    Ok(view) => {
                        let ctx = Ctx {
                            ttl: secs(cfg.service_ttl_for(&key.service)),
                            dc: key.dc.as_deref().unwrap_or(ctx.dc),
                            peer: key.tenancy.peer(),
                            partition: key.tenancy.partition(),
                            ..ctx
                        };
                        let tag = tag.as_deref();
                        let selection =
                            records::select(&view, tag, cfg.only_passing, cfg.when_none_healthy);
                        self.remember(&key, &view, &selection, &ctx);
                        Ok(answer_from_view(&view, &selection, true, limit, &ctx))
                    }
                    Err(e) => missing(e, &ctx),
                }
            }
            ConsulName::Virtual { service, tenancy } => {
                // The connect view carries the virtual IP (every connect instance has it).
                let key = ViewKey::new(service, None, ServiceKind::Connect, tenancy);
                match self.backend.service(&key).await {
                    Ok(view) => Ok(Plan::Done(records::virtual_answer(view.virtual_ip, &ctx))),
                    Err(LookupError::Unavailable(_)) => Err(Answer::servfail()),
                    // Consul answers NOERROR without records for a service it has no virtual
                    // IP for, known or not.
                    Err(_) => Ok(Plan::Done(records::virtual_answer(None, &ctx))),
                }
            }
            ConsulName::Node { node, dc, tenancy } => {
                match self
                    .backend
                    .node(&node, norm(dc).as_deref(), &tenancy)
                    .await
                {
                    Ok(node) => Ok(records::node_answer(node.as_deref(), &ctx)),
                    Err(e) => missing(e, &ctx),
                }
            }
            ConsulName::Query { query, dc } => {
                match self.backend.query(&query, norm(dc).as_deref()).await {
                    Ok(Some(qv)) => {
                        ctx.ttl = secs(qv.ttl.unwrap_or_else(|| cfg.service_ttl_for(&query)));
                        // Consul's result as it came: its own filters, its order when it
                        // sorted it, shuffled like every other answer when it did not.
                        let selection = records::select_all(&qv.service);
                        let shuffle = !qv.keeps_order;
                        Ok(answer_from_view(
                            &qv.service,
                            &selection,
                            shuffle,
                            limit,
                            &ctx,
                        ))
                    }
                    Ok(None) => Ok(Plan::Done(records::nxdomain(&ctx))),
                    Err(e) => missing(e, &ctx),
                }
            }
        }
    }

    /// SOA and NS: the domain's nameservers are the healthy Consul servers (the instances of
    /// Consul's own `consul` service), shuffled, as Consul lists them. Without servers to list
    /// the SOA is still answered; an NS question then gets SERVFAIL while Consul is unreachable
    /// (Consul's empty answer would be cached as "no nameservers").
    async fn nameserver_answer(&self, ctx: &Ctx<'_>) -> Result<Plan, Answer> {
        let key = ViewKey::new(
            CONSUL_SERVICE.to_owned(),
            None,
            ServiceKind::Service,
            Tenancy::default(),
        );
        let view = match self.backend.service(&key).await {
            Ok(view) => Some(view),
            Err(LookupError::Unavailable(_)) if ctx.qtype == RecordType::NS => {
                return Err(Answer::servfail())
            }
            Err(_) => None,
        };
        let servers = view.as_ref().map_or_else(Vec::new, |view| {
            let selection = records::select(
                view,
                None,
                self.config.only_passing,
                WhenNoneHealthy::Nxdomain,
            );
            let every = selection.all.len();
            records::pick(view, &selection, RecordType::SRV, every, &mut rand::rng())
        });
        let dc = view
            .as_ref()
            .map(|v| v.datacenter.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(ctx.dc);
        let ctx = Ctx { dc, ..ctx.clone() };
        Ok(Plan::Done(match ctx.qtype {
            RecordType::NS => records::ns_answer(&servers, &ctx),
            _ => records::soa_answer(&servers, &ctx),
        }))
    }

    /// The CNAME first, then the target's records, in chain order (glibc ≥ 2.37 ignores
    /// addresses that do not follow the chain).
    async fn follow_cname(
        &self,
        mut answer: Answer,
        target: Name,
        q: &Question,
        limit: usize,
    ) -> Answer {
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

/// A service view's answer from `selection`: a random sample of what can fit in `limit`
/// (`shuffle`), or the first that fit in the view's order, then records. SRV targets name the
/// view's datacenter when it has one, else `ctx.dc`.
fn answer_from_view(
    view: &ServiceView,
    selection: &Selection,
    shuffle: bool,
    limit: usize,
    ctx: &Ctx<'_>,
) -> Plan {
    let cap = records::record_cap(ctx.qtype, limit, ctx.qname.len());
    let chosen = if shuffle {
        records::pick(view, selection, ctx.qtype, cap, &mut rand::rng())
    } else {
        records::first(view, selection, ctx.qtype, cap)
    };
    let dc = if view.datacenter.is_empty() {
        ctx.dc
    } else {
        view.datacenter.as_str()
    };
    records::service_answer(
        &chosen,
        !selection.all.is_empty(),
        &Ctx { dc, ..ctx.clone() },
    )
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

    /// A service's A or AAAA answer from its pre-encoded records, while their view is current.
    fn reply_from_cache(
        &self,
        query: &PlainQuery<'_>,
        key: &[u8],
        limit: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let rules = encoded::Rules {
            a_record_limit: self.config.a_record_limit,
            udp_answer_limit: self.config.udp_answer_limit,
            truncate: self.config.enable_truncate,
        };
        self.encoded.reply(key, now, |entry| {
            encoded::write_reply(out, query, entry, limit, rules, &mut rand::rng())
        })
    }

    fn cached_source(&self) -> Source {
        Source::Consul
    }

    fn as_consul(&self) -> Option<&ConsulSource> {
        Some(self)
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
