//! Memory of the answer cache per cached name (issue 6's target: RSS ≤ 32 MiB with 100,000
//! cached names), measured with a counting allocator, so the number is the cache's own and not
//! the allocator's or the runtime's.
//!
//! ```sh
//! cargo bench --bench cache_memory            # 100,000 names
//! ```
//!
//! Under `cargo test --all-targets` it runs with 10,000 names as a smoke test.
//!
//! Each name is cached the way a forwarded miss is: `Cache::fetch` with an upstream reply of one
//! A record (`f<n>.miss.test. 300 IN A`), as the load benchmark's fill-100k scenario does.
//!
//! Then the DNSSEC cost: the same names fetched for a DO client, unsigned (the same entry as
//! without DO) and signed (the A record and an ECDSA P-256 RRSIG, as unbound gives it to a DO
//! client: one entry holding both forms, the signed one and the one for clients without DO).

use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use consul_dns_forwarder::answer::{Dnssec, Question};
use consul_dns_forwarder::cache::{Cache, CachedAnswer};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/policy.rs"]
mod policy;

use counting_alloc::{live, rss_kib};
use policy::policy;

fn reply(name: &Name, i: usize) -> Message {
    let mut m = Message::new(1, MessageType::Response, OpCode::Query);
    m.metadata.response_code = ResponseCode::NoError;
    m.add_query(Query::query(name.clone(), RecordType::A));
    m.add_answer(Record::from_rdata(
        name.clone(),
        300,
        RData::A(A::new(192, 0, (i >> 8) as u8, i as u8)),
    ));
    m
}

fn question(i: usize) -> Question {
    Question {
        name: Name::from_str(&format!("f{i}.miss.test.")).expect("name"),
        qtype: RecordType::A,
        qclass: DNSClass::IN,
    }
}

/// Name `i` cached as a forwarded miss stores it.
async fn store(cache: &Cache, i: usize) {
    store_for(cache, i, Dnssec::default(), false).await;
}

/// Name `i` cached as fetched for a client with `dnssec`'s bits, its answer signed or not.
async fn store_for(cache: &Cache, i: usize, dnssec: Dnssec, signed: bool) {
    let q = question(i);
    let mut msg = reply(&q.name, i);
    if signed {
        msg.add_answer(rrsig(&q.name));
    }
    cache
        .fetch_dnssec(&q, dnssec, move || async move { Ok(msg) })
        .await
        .expect("stored");
}

/// An RRSIG over the A record as a P-256 zone signs it: 18 bytes of fields, the signer's name
/// (`miss.test.`), a 64-byte signature. Opaque to hickory, as in the program.
fn rrsig(owner: &Name) -> Record {
    let mut rdata = vec![0, 1, 13, 3, 0, 0, 1, 44];
    rdata.extend_from_slice(&[0x6a, 0, 0, 0, 0x69, 0, 0, 0, 0x12, 0x34]);
    rdata.extend_from_slice(b"\x04miss\x04test\x00");
    rdata.extend_from_slice(&[0xab; 64]);
    Record::from_rdata(
        owner.clone(),
        300,
        RData::Unknown {
            code: RecordType::RRSIG,
            rdata: hickory_proto::rr::rdata::NULL::with(rdata),
        },
    )
}

/// Live heap per name of a cache holding `n` names stored as `store_for(.., dnssec, signed)`.
fn heap_per_name(rt: &tokio::runtime::Runtime, n: usize, dnssec: Dnssec, signed: bool) -> f64 {
    let before = live();
    let cache = Cache::new(100_000, policy(), None);
    rt.block_on(async {
        for i in 0..n {
            store_for(&cache, i, dnssec, signed).await;
        }
    });
    let per = (live() - before) as f64 / n as f64;
    drop(cache);
    per
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` does not: a smaller smoke run there.
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 100_000 } else { 10_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("cache_memory: {n} names, one A record each");
    println!(
        "  size_of: Record {} B, Name {} B, Question {} B, CachedAnswer {} B",
        std::mem::size_of::<Record>(),
        std::mem::size_of::<Name>(),
        std::mem::size_of::<Question>(),
        std::mem::size_of::<CachedAnswer>()
    );

    // The entries alone, outside any cache: what the stored representation costs.
    let before = live();
    let now = Instant::now();
    let entries: Vec<(Question, CachedAnswer)> = (0..n)
        .map(|i| {
            let q = question(i);
            let e = CachedAnswer::from_message(&q, &reply(&q.name, i), &policy(), now)
                .expect("cacheable");
            (q, e)
        })
        .collect();
    let bare = live()
        - before
        - (entries.capacity() * std::mem::size_of::<(Question, CachedAnswer)>()) as isize;
    let bare_per =
        (bare as f64 + (n * std::mem::size_of::<(Question, CachedAnswer)>()) as f64) / n as f64;
    drop(entries);

    // The same through the cache, as a forwarded miss stores it.
    let rss0 = rss_kib();
    let before = live();
    let allocs0 = counting_alloc::allocs();
    let cache = Cache::new(100_000, policy(), None);
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            store(&cache, i).await;
        }
    });
    let took = started.elapsed();
    // Wait until every entry is counted (a no-op for a cache whose count is exact).
    for _ in 0..50 {
        if cache.entry_count() as usize >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let _ = cache.lookup(&question(0), Instant::now());
    }
    let cached = live() - before;
    let allocs = counting_alloc::allocs() - allocs0;
    let rss1 = rss_kib();
    println!(
        "  entries alone (Question + CachedAnswer, heap included): {:.0} B per name",
        bare_per
    );
    println!(
        "  in the cache: {:.0} B live heap per name ({:.1} MiB for {n}), {} entries counted",
        cached as f64 / n as f64,
        cached as f64 / 1_048_576.0,
        cache.entry_count()
    );
    println!(
        "  RSS grew {:.1} MiB ({:.0} B per name); {:.1} allocations per insert; {:.2} µs per insert",
        (rss1.saturating_sub(rss0)) as f64 / 1024.0,
        (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64,
        allocs as f64 / n as f64,
        took.as_secs_f64() * 1e6 / n as f64
    );
    drop(cache);

    // Again, with nine hits (lookup + to_answer) between inserts, as in the load benchmark's
    // mix-10pct-miss scenario: does serving hits make the cache hold more?
    let before = live();
    let cache = Cache::new(100_000, policy(), None);
    rt.block_on(async {
        for i in 0..n {
            store(&cache, i).await;
            for j in 1..10 {
                let hit = question(i.saturating_sub(j * 7) % (i + 1));
                if let consul_dns_forwarder::cache::Lookup::Fresh(e) =
                    cache.lookup(&hit, Instant::now())
                {
                    std::hint::black_box(e.to_answer(Instant::now(), false));
                }
            }
        }
    });
    let mixed = live() - before;
    println!(
        "  with 9 hits per insert: {:.0} B live heap per name",
        mixed as f64 / n as f64
    );
    println!(
        "  => 100,000 names: ~{:.0} MiB of live heap in the cache alone (target for the whole process: 32 MiB)",
        cached as f64 / n as f64 * 100_000.0 / 1_048_576.0
    );

    let dnssec_ok = Dnssec {
        dnssec_ok: true,
        ..Dnssec::default()
    };
    let plain = heap_per_name(&rt, n, Dnssec::default(), false);
    let unsigned_do = heap_per_name(&rt, n, dnssec_ok, false);
    let signed_do = heap_per_name(&rt, n, dnssec_ok, true);
    println!("  DNSSEC (one entry serves clients with and without DO):");
    println!("    fetched without DO: {plain:.0} B per name");
    println!("    fetched with DO, unsigned answer: {unsigned_do:.0} B per name (the same entry)");
    println!(
        "    fetched with DO, signed (A + RRSIG): {signed_do:.0} B per name, both forms in one entry \
         (keyed apart, a DO entry and a plain one would take about {:.0} B)",
        signed_do + plain - 16.0
    );
}
