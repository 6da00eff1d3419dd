//! Micro-benchmarks of the query hot path, through the library's public API only.
//!
//! ```sh
//! cargo bench --bench hot_path                 # everything
//! cargo bench --bench hot_path -- consul_view  # one group
//! ```
//!
//! Groups:
//! - `name_parse`: Consul's name grammar (`consul::name::parse`), plus the lowercasing the handler
//!   does first (`answer::Question::from_query`).
//! - `request_parse`: the request bytes parsed into a hickory `Message` (done for every query).
//! - `cache_hit`: a forwarded cache hit turned into reply bytes: `write_reply` (the hot path:
//!   bytes patched), and for comparison the general path (`CachedAnswer::to_answer` +
//!   `reply::encode_reply`); the cache lookup in front of it.
//! - `consul_view`: a Consul view turned into records and reply bytes for 1, 10, 100 and 5,000
//!   instances (issue 8: the cost of an answer should not grow with the instance count).
//! - `handler`: `Handler::handle` end to end (bytes in, bytes out, metrics included) for a Consul
//!   name served from a catalog, and for a forwarded cache hit; the same hit through
//!   `Handler::handle_cached` (the inline hot path of the UDP loop), without EDNS, with EDNS,
//!   and with EDNS and DO (a DNSSEC client: its entry was fetched with DO); a Consul name's A
//!   answer the same way (`consul_a_inline_edns`: the encoded records sampled and copied).
//!
//! `cache_hit/write_reply_do` and `handler/forwarded_cache_hit_inline_do` are the DO client's
//! hot path, measured before and after DNSSEC forwarding (docs/benchmarks.md).
//!
//! Nothing here opens a socket.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde_json::json;

use consul_dns_forwarder::answer::{Dnssec, Question};
use consul_dns_forwarder::cache::{Cache, CachedAnswer, Lookup};
use consul_dns_forwarder::config::{Config, WhenNoneHealthy};
use consul_dns_forwarder::consul::addrs::Addrs;
use consul_dns_forwarder::consul::catalog::{service_id_key, Instance, ServiceView, Status};
use consul_dns_forwarder::consul::file::FileBackend;
use consul_dns_forwarder::consul::name;
use consul_dns_forwarder::consul::records::{self, Ctx, Plan};
use consul_dns_forwarder::consul::ConsulSource;
use consul_dns_forwarder::handler::{Cached, ConsulRoute, Handler, Routes};
use consul_dns_forwarder::metrics::Metrics;
use consul_dns_forwarder::raw;
use consul_dns_forwarder::reply::{self, Transport};
use consul_dns_forwarder::upstream::Forwarder;

#[path = "support/policy.rs"]
mod policy;

use policy::policy;

/// Instance counts of the `consul_view` and `handler` groups. 5,000 is issue 8's large service.
const SIZES: [usize; 4] = [1, 10, 100, 5_000];

fn n(s: &str) -> Name {
    Name::from_str(s).expect("valid name")
}

/// A query as nginx and glibc send it: RD=1, one question, EDNS only when asked for.
fn request(qname: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(n(qname), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.edns = Some(e);
    }
    m
}

/// A query as a DNSSEC client sends it (`dig +dnssec`, a validating stub): EDNS with DO, and
/// AD set.
fn dnssec_request(qname: &str, qtype: RecordType) -> Message {
    let mut m = request(qname, qtype, true);
    m.metadata.authentic_data = true;
    if let Some(e) = m.edns.as_mut() {
        e.set_dnssec_ok(true);
    }
    m
}

/// An upstream reply for `qname`: `a` A records, behind a CNAME when `cname` is set.
fn upstream_reply(qname: &str, a: u8, cname: bool) -> Message {
    let owner = n(qname);
    let mut m = Message::new(1, MessageType::Response, OpCode::Query);
    m.metadata.response_code = ResponseCode::NoError;
    m.metadata.recursion_available = true;
    m.add_query(Query::query(owner.clone(), RecordType::A));
    let target = if cname {
        let t = n("edge.cdn.example.net.");
        m.add_answer(Record::from_rdata(
            owner.clone(),
            300,
            RData::CNAME(CNAME(t.clone())),
        ));
        t
    } else {
        owner
    };
    for i in 0..a {
        m.add_answer(Record::from_rdata(
            target.clone(),
            300,
            RData::A(A::new(192, 0, 2, i + 1)),
        ));
    }
    m
}

fn instance(i: usize) -> Instance {
    let ip = IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8));
    Instance {
        node: format!("node-{i}").into(),
        service_id: service_id_key(&format!("web-{i}")),
        addrs: Addrs::ip(ip, true),
        port: 8080,
        tags: vec!["v1".into(), "primary".into()].into(),
        // One in ten critical, one in ten warning: select() has work to do.
        status: match i % 10 {
            0 => Status::Critical,
            1 => Status::Warning,
            _ => Status::Passing,
        },
        weight_passing: 10,
        weight_warning: 1,
        node_meta: Default::default(),
    }
}

fn view(size: usize) -> ServiceView {
    // With size 1 the only instance must be healthy.
    ServiceView::new(
        (0..size)
            .map(|i| instance(i + usize::from(size == 1) * 2))
            .collect(),
        "dc1",
    )
}

/// What the Consul source does per question: the (cached) selection, a random sample of what
/// can fit in `limit`, records.
fn built(v: &ServiceView, ctx: &Ctx<'_>, limit: usize) -> Plan {
    let selection = records::select(v, None, false, WhenNoneHealthy::Nxdomain);
    let chosen = records::pick(
        v,
        &selection,
        ctx.qtype,
        records::record_cap(ctx.qtype, limit, ctx.qname.len()),
        &mut rand::rng(),
    );
    records::service_answer(&chosen, !selection.all.is_empty(), ctx)
}

/// A catalog file (`{"<service>": [health entries]}`) with one service of `size` instances.
fn catalog_json(service: &str, size: usize) -> String {
    let entries: Vec<serde_json::Value> = (0..size)
        .map(|i| {
            let status = if size > 1 && i % 10 == 0 {
                "critical"
            } else {
                "passing"
            };
            json!({
                "Node": {"Node": format!("node-{i}"), "Address": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255), "Datacenter": "dc1"},
                "Service": {"ID": format!("{service}-{i}"), "Service": service, "Tags": ["v1"], "Address": "", "Port": 8080},
                "Checks": [
                    {"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
                    {"CheckID": format!("service:{service}-{i}"), "Status": status, "ServiceID": format!("{service}-{i}")}
                ]
            })
        })
        .collect();
    json!({ service: entries }).to_string()
}

fn bench_name_parse(c: &mut Criterion) {
    let domains = [n("consul.")];
    let mut g = c.benchmark_group("name_parse");
    for (label, qname, qtype) in [
        ("service", "web.service.consul.", RecordType::A),
        ("tag_dc", "v1.web.service.dc1.consul.", RecordType::A),
        ("rfc2782_srv", "_web._tcp.service.consul.", RecordType::SRV),
        ("node", "node-1.node.consul.", RecordType::A),
        ("outside", "www.example.com.", RecordType::A),
    ] {
        let qn = n(qname);
        g.bench_function(label, |b| {
            b.iter(|| name::parse(black_box(&qn), qtype, black_box(&domains)))
        });
    }
    let query = Query::query(n("Web.Service.Consul."), RecordType::A);
    g.bench_function("question_from_query", |b| {
        b.iter(|| Question::from_query(black_box(&query)))
    });
    g.finish();
}

fn bench_request_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_parse");
    for (label, edns) in [("no_edns", false), ("edns", true)] {
        let bytes = request("h7.test.", RecordType::A, edns)
            .to_vec()
            .expect("encodes");
        g.bench_function(label, |b| {
            b.iter(|| Message::from_vec(black_box(&bytes)).expect("parses"))
        });
    }
    g.finish();
}

fn bench_cache_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_hit");
    let now = Instant::now();
    for (label, a, cname) in [("1_a", 1, false), ("4_a", 4, false), ("cname_2_a", 2, true)] {
        let qname = "www.example.com.";
        let question = Question {
            name: n(qname),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let entry =
            CachedAnswer::from_message(&question, &upstream_reply(qname, a, cname), &policy(), now)
                .expect("cacheable");
        let req = request(qname, RecordType::A, false);
        let limit = reply::reply_limit(&req, Transport::Udp);
        let later = now + Duration::from_millis(1500);
        let req_bytes = req.to_vec().expect("encodes");
        let mut out = Vec::with_capacity(1232);
        // The hot path: the plain query read as bytes and the reply written from cached bytes.
        g.bench_function(BenchmarkId::new("write_reply", label), |b| {
            b.iter(|| {
                let q = raw::parse_plain_query(black_box(&req_bytes)).expect("plain");
                black_box(&entry).write_reply(&mut out, &q, limit, later, false, false)
            })
        });
        // As a Consul name answered through the agents' DNS port is: the addresses shuffled.
        g.bench_function(BenchmarkId::new("write_reply_shuffled", label), |b| {
            b.iter(|| {
                let q = raw::parse_plain_query(black_box(&req_bytes)).expect("plain");
                black_box(&entry).write_reply(&mut out, &q, limit, later, false, true)
            })
        });
        // The same for a DNSSEC client (EDNS, DO and AD in the query; DO echoed in the reply).
        let do_bytes = dnssec_request(qname, RecordType::A)
            .to_vec()
            .expect("encodes");
        g.bench_function(BenchmarkId::new("write_reply_do", label), |b| {
            b.iter(|| {
                let q = raw::parse_plain_query(black_box(&do_bytes)).expect("plain");
                black_box(&entry).write_reply(&mut out, &q, 1232, later, false, false)
            })
        });
        g.bench_function(BenchmarkId::new("to_answer", label), |b| {
            b.iter(|| black_box(&entry).to_answer(later, false))
        });
        g.bench_function(BenchmarkId::new("to_answer_encode", label), |b| {
            b.iter(|| {
                let answer = black_box(&entry).to_answer(later, false);
                reply::encode_reply(black_box(&req), &answer, limit)
            })
        });
    }

    // The cache lookup in front of it, with 10,000 entries in the cache.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = Cache::new(100_000, policy(), None);
    let keys: Vec<Question> = (0..10_000)
        .map(|i| Question {
            name: n(&format!("h{i}.test.")),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        })
        .collect();
    rt.block_on(async {
        for k in &keys {
            let reply = upstream_reply(&k.name.to_ascii(), 1, false);
            cache
                .fetch(k, move || async move { Ok(reply) })
                .await
                .expect("stored");
        }
    });
    let mut i = 0usize;
    g.bench_function("lookup_10k_entries", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            match cache.lookup(black_box(&keys[i]), Instant::now()) {
                Lookup::Fresh(e) => e,
                _ => panic!("expected a fresh hit"),
            }
        })
    });
    g.finish();
}

fn bench_consul_view(c: &mut Criterion) {
    let qname = n("web.service.consul.");
    let domain = n("consul.");
    let ctx = Ctx {
        qname: &qname,
        qtype: RecordType::A,
        domain: &domain,
        dc: "dc1",
        ttl: 5,
        negative_ttl: 5,
        a_record_limit: 0,
        serial: 1,
        soa: Default::default(),
        node_meta_txt: true,
        peer: None,
        partition: None,
    };
    let srv_ctx = Ctx {
        qtype: RecordType::SRV,
        ..ctx.clone()
    };
    let req = request("web.service.consul.", RecordType::A, false);
    let srv_req = request("web.service.consul.", RecordType::SRV, true);
    let mut g = c.benchmark_group("consul_view");
    for size in SIZES {
        let v = view(size);
        if size >= 1_000 {
            g.sample_size(20);
        }
        g.bench_with_input(BenchmarkId::new("select", size), &v, |b, v| {
            b.iter(|| records::select(black_box(v), None, false, WhenNoneHealthy::Nxdomain))
        });
        g.bench_with_input(
            BenchmarkId::new("select_shuffle_records_a", size),
            &v,
            |b, v| b.iter(|| built(black_box(v), &ctx, 512)),
        );
        // What a client gets: the records encoded into a 512-byte UDP reply (no EDNS, as nginx
        // and glibc ask), truncated with TC=1 when they do not fit.
        g.bench_with_input(BenchmarkId::new("answer_a_udp512", size), &v, |b, v| {
            b.iter(|| match built(black_box(v), &ctx, 512) {
                Plan::Done(answer) => reply::encode_reply(&req, &answer, 512),
                Plan::Cname { .. } => unreachable!("IP instances"),
            })
        });
        // The encode step alone, from records already built.
        let answer = {
            match built(&v, &ctx, 512) {
                Plan::Done(answer) => answer,
                Plan::Cname { .. } => unreachable!("IP instances"),
            }
        };
        g.bench_with_input(
            BenchmarkId::new("encode_a_udp512", size),
            &answer,
            |b, a| b.iter(|| reply::encode_reply(&req, black_box(a), 512)),
        );
        g.bench_with_input(BenchmarkId::new("answer_srv_edns1232", size), &v, |b, v| {
            b.iter(|| match built(black_box(v), &srv_ctx, 1232) {
                Plan::Done(answer) => reply::encode_reply(&srv_req, &answer, 1232),
                Plan::Cname { .. } => unreachable!("IP instances"),
            })
        });
    }
    g.finish();
}

fn bench_handler(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut g = c.benchmark_group("handler");

    let make_handler = |catalog: &str| -> (Handler, Arc<Forwarder>) {
        // The production stack (no upstream: every answer here comes from the cache or Consul).
        let mut config = Config::default();
        config.upstream.servers = Vec::new();
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).expect("metrics");
        let forwarder = Arc::new(Forwarder::from_config(&config, &metrics));
        let backend = FileBackend::from_text(catalog, "bench-catalog.json", None).expect("catalog");
        let source = ConsulSource::new(Arc::new(backend), &config.consul, forwarder.clone());
        let handler = Handler::new(
            Routes {
                allow: config.server.allow.clone(),
                consul: Some(ConsulRoute::new(
                    config.consul.domains.clone(),
                    Arc::new(source),
                )),
                forwarder: forwarder.clone(),
                log_queries: false,
                rate_limit: None,
            },
            metrics,
        );
        (handler, forwarder)
    };

    // A forwarded cache hit.
    let (handler, forwarder) = make_handler(&catalog_json("web", 3));
    let q = Question {
        name: n("www.example.com."),
        qtype: RecordType::A,
        qclass: DNSClass::IN,
    };
    let reply = upstream_reply("www.example.com.", 2, false);
    rt.block_on(
        forwarder
            .cache()
            .fetch(&q, move || async move { Ok(reply) }),
    )
    .expect("stored");
    let packet = request("www.example.com.", RecordType::A, false)
        .to_vec()
        .expect("encodes");
    g.bench_function("forwarded_cache_hit", |b| {
        b.iter(|| {
            rt.block_on(handler.handle(black_box(&packet), client, Transport::Udp))
                .expect("a reply")
        })
    });
    // The same hit on the hot path the UDP loop takes first: no runtime, no Message.
    let mut out = Vec::with_capacity(1232);
    g.bench_function("forwarded_cache_hit_inline", |b| {
        b.iter(|| {
            assert_eq!(
                handler.handle_cached(
                    black_box(&packet),
                    client,
                    Transport::Udp,
                    Instant::now(),
                    &mut out
                ),
                Cached::Replied
            );
        })
    });
    // With EDNS, and with EDNS and DO: the DNSSEC client's hit. The entry is fetched with DO
    // (the same unsigned answer, so one entry serves both).
    let dnssec_ok = Dnssec {
        dnssec_ok: true,
        checking_disabled: false,
        authentic_data: true,
    };
    let reply = upstream_reply("www.example.com.", 2, false);
    rt.block_on(
        forwarder
            .cache()
            .fetch_dnssec(&q, dnssec_ok, move || async move { Ok(reply) }),
    )
    .expect("stored");
    for (label, query) in [
        (
            "forwarded_cache_hit_inline_edns",
            request("www.example.com.", RecordType::A, true),
        ),
        (
            "forwarded_cache_hit_inline_do",
            dnssec_request("www.example.com.", RecordType::A),
        ),
    ] {
        let bytes = query.to_vec().expect("encodes");
        g.bench_function(label, |b| {
            b.iter(|| {
                let got = handler.handle_cached(
                    black_box(&bytes),
                    client,
                    Transport::Udp,
                    Instant::now(),
                    &mut out,
                );
                assert_eq!(got, Cached::Replied);
            })
        });
    }
    // The runtime's share of the general path: an empty future through the same block_on.
    g.bench_function("block_on_overhead", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });

    for size in SIZES {
        if size >= 1_000 {
            g.sample_size(20);
        }
        let (handler, _) = make_handler(&catalog_json("web", size));
        let packet = request("web.service.consul.", RecordType::A, false)
            .to_vec()
            .expect("encodes");
        g.bench_function(BenchmarkId::new("consul_a", size), |b| {
            b.iter_batched_ref(
                || packet.clone(),
                |p| {
                    rt.block_on(handler.handle(black_box(p), client, Transport::Udp))
                        .expect("a reply")
                },
                BatchSize::SmallInput,
            )
        });
        // The hot path the UDP loop takes for it once the general path has answered it once:
        // the encoded records, sampled and copied. With EDNS 1232, the most a reply carries.
        let edns = request("web.service.consul.", RecordType::A, true)
            .to_vec()
            .expect("encodes");
        rt.block_on(handler.handle(&edns, client, Transport::Udp))
            .expect("a reply");
        g.bench_function(BenchmarkId::new("consul_a_inline_edns", size), |b| {
            b.iter(|| {
                let got = handler.handle_cached(
                    black_box(&edns),
                    client,
                    Transport::Udp,
                    Instant::now(),
                    &mut out,
                );
                assert_eq!(got, Cached::Replied);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_name_parse,
    bench_request_parse,
    bench_cache_hit,
    bench_consul_view,
    bench_handler
);
criterion_main!(benches);
