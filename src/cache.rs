//! The answer cache: one entry per (lowercased name, type, class), TTLs counting down on the way
//! out, negative answers kept per RFC 2308, expired entries kept a while longer so they can be
//! served stale when every upstream fails (RFC 8767), and concurrent identical misses merged into
//! one upstream query.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record};

use crate::wire::{Answer, Question, STALE_TTL};

/// TTL rules applied when an upstream message is stored.
#[derive(Clone, Debug)]
pub struct TtlPolicy {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Cap on negative caching (RFC 2308: the SOA's minimum, capped by this).
    pub negative_ttl: Duration,
    /// Floor for negative answers (0 normally; the dnsmasq-compatible Consul mode raises it because
    /// Consul's SOA minimum is 0).
    pub negative_min_ttl: Duration,
    /// How long after expiry an entry may still be served when upstreams fail.
    pub stale_for: Duration,
}

/// A stored answer. Record TTLs are the clamped ones at `stored_at`.
#[derive(Debug)]
pub struct CachedAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub stored_at: Instant,
    /// How long the entry is fresh.
    pub ttl: Duration,
    /// False for a negative answer without SOA: passed on to the client, never stored
    /// (RFC 2308 §5).
    pub cacheable: bool,
}

impl CachedAnswer {
    /// Turns an upstream reply into an entry, or `None` for error rcodes (SERVFAIL, REFUSED...),
    /// which are never cached.
    pub fn from_message(msg: &Message, policy: &TtlPolicy, now: Instant) -> Option<CachedAnswer> {
        let clamp = |ttl: u32| -> u32 {
            let secs = u64::from(ttl).clamp(policy.min_ttl.as_secs(), policy.max_ttl.as_secs());
            u32::try_from(secs).unwrap_or(u32::MAX)
        };
        let negative = msg.metadata.response_code == ResponseCode::NXDomain
            || (msg.metadata.response_code == ResponseCode::NoError && msg.answers.is_empty());
        match msg.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            _ => return None,
        }
        let (answers, mut authorities, additionals, ttl);
        let mut cacheable = true;
        if negative {
            let soa = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some((r.ttl, soa.minimum)),
                _ => None,
            });
            let (soa_ttl, minimum) = soa.unwrap_or((0, 0));
            cacheable = soa.is_some();
            let secs = u64::from(soa_ttl.min(minimum))
                .min(policy.negative_ttl.as_secs())
                .max(policy.negative_min_ttl.as_secs());
            let neg = u32::try_from(secs).unwrap_or(u32::MAX);
            ttl = Duration::from_secs(secs);
            answers = msg.answers.clone();
            // RFC 2308 §3: the SOA's TTL in a negative answer is the negative caching time.
            authorities = msg
                .authorities
                .iter()
                .filter(|r| matches!(r.data, RData::SOA(_)))
                .cloned()
                .collect::<Vec<_>>();
            for r in &mut authorities {
                r.ttl = neg;
            }
            additionals = Vec::new();
        } else {
            let clamped = |records: &[Record]| -> Vec<Record> {
                records
                    .iter()
                    .filter(|r| !matches!(r.data, RData::OPT(_)))
                    .map(|r| {
                        let mut r = r.clone();
                        r.ttl = clamp(r.ttl);
                        r
                    })
                    .collect()
            };
            answers = clamped(&msg.answers);
            authorities = clamped(&msg.authorities);
            additionals = clamped(&msg.additionals);
            ttl = Duration::from_secs(u64::from(answers.iter().map(|r| r.ttl).min().unwrap_or(0)));
        }
        // Collected through filters, the vectors start with room for 4 records (over 1 KiB
        // unused for a single A record); entries live long and are many, so trim them.
        let (mut answers, mut authorities, mut additionals) = (answers, authorities, additionals);
        answers.shrink_to_fit();
        authorities.shrink_to_fit();
        additionals.shrink_to_fit();
        Some(CachedAnswer {
            rcode: msg.metadata.response_code,
            answers,
            authorities,
            additionals,
            stored_at: now,
            ttl,
            cacheable,
        })
    }

    /// What the entry costs in memory, roughly: encoded records plus fixed overhead.
    pub fn approx_bytes(&self) -> u32 {
        const ENTRY_OVERHEAD: usize = 160;
        const RECORD_OVERHEAD: usize = 64;
        let records = self
            .answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
            .map(|r| crate::wire::record_len(r) + RECORD_OVERHEAD)
            .sum::<usize>();
        u32::try_from(ENTRY_OVERHEAD + records).unwrap_or(u32::MAX)
    }

    /// Seconds since storing, rounded down.
    fn age_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.stored_at).as_secs()).unwrap_or(u32::MAX)
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored_at) < self.ttl
    }

    /// The answer with every TTL reduced by the entry's age (fresh), or set to 30 s (stale).
    pub fn to_answer(&self, now: Instant, stale: bool) -> Answer {
        let age = self.age_secs(now);
        let adjust = |records: &[Record]| -> Vec<Record> {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = if stale {
                        STALE_TTL
                    } else {
                        r.ttl.saturating_sub(age)
                    };
                    r
                })
                .collect()
        };
        Answer {
            rcode: self.rcode,
            authoritative: false,
            answers: adjust(&self.answers),
            authorities: adjust(&self.authorities),
            additionals: adjust(&self.additionals),
        }
    }
}

/// Why an upstream fetch gave nothing cacheable. Cloneable because one fetch serves every waiter.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("upstream answered {0}")]
    Rcode(ResponseCode),
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Io(String),
    #[error("the fetch task failed")]
    Aborted,
    #[error("too many upstream queries in flight (upstream.max_inflight)")]
    Overloaded,
}

/// The result of a fetch: the entry, and whether it came from a new upstream answer that is not
/// cacheable (then it is served once, uncached).
pub type FetchResult = Result<Arc<CachedAnswer>, FetchError>;

type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// Clears a key's in-flight mark when its fetch task ends, however it ends.
struct InflightGuard {
    cache: Cache,
    key: Question,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.cache.remove_inflight(&self.key);
    }
}

/// What the cache holds for a key right now.
pub enum Lookup {
    Fresh(Arc<CachedAnswer>),
    /// Expired but within `stale_for`: refresh, and serve this if the refresh fails.
    Expired(Arc<CachedAnswer>),
    Miss,
}

/// Per-entry lifetime in moka: fresh TTL plus the stale window.
struct EntryExpiry {
    stale_for: Duration,
}

impl moka::Expiry<Question, Arc<CachedAnswer>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &Question,
        value: &Arc<CachedAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl.saturating_add(self.stale_for))
    }
}

/// The cache. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Cache {
    entries: moka::sync::Cache<Question, Arc<CachedAnswer>>,
    inflight: Arc<Mutex<HashMap<Question, SharedFetch>>>,
    policy: TtlPolicy,
}

impl Cache {
    /// A cache of at most `max_entries` (about 1 KiB each at most on average); entries evicted
    /// for space (not expiry) are counted in `evictions`.
    pub fn new(
        max_entries: u64,
        policy: TtlPolicy,
        evictions: Option<prometheus::IntCounter>,
    ) -> Cache {
        Cache::with_limits(
            max_entries,
            max_entries.saturating_mul(1024),
            policy,
            evictions,
        )
    }

    /// A cache bounded both in entries and in (approximate) bytes.
    ///
    /// moka bounds one measure, so each entry weighs its size in bytes but at least
    /// `max_bytes / max_entries`: the total weight then stays under `max_bytes`, and the count
    /// under `max_entries`.
    pub fn with_limits(
        max_entries: u64,
        max_bytes: u64,
        policy: TtlPolicy,
        evictions: Option<prometheus::IntCounter>,
    ) -> Cache {
        let floor = u32::try_from(max_bytes / max_entries.max(1))
            .unwrap_or(u32::MAX)
            .max(1);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |_key: &Question, value: &Arc<CachedAnswer>| {
                value.approx_bytes().max(floor)
            })
            .expire_after(EntryExpiry {
                stale_for: policy.stale_for,
            })
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    if let Some(counter) = &evictions {
                        counter.inc();
                    }
                }
            })
            .build();
        Cache {
            entries,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            policy,
        }
    }

    pub fn policy(&self) -> &TtlPolicy {
        &self.policy
    }

    pub fn lookup(&self, key: &Question, now: Instant) -> Lookup {
        match self.entries.get(key) {
            Some(entry) if entry.is_fresh(now) => Lookup::Fresh(entry),
            Some(entry) => Lookup::Expired(entry),
            None => Lookup::Miss,
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Runs `fetch` for `key` unless a fetch for the same key is already running, in which case
    /// its result is shared. The fetch runs in its own task, so a client giving up does not
    /// cancel it for the others. A cacheable result is stored before it is returned.
    pub async fn fetch<F, Fut>(&self, key: &Question, fetch: F) -> FetchResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Message, FetchError>> + Send + 'static,
    {
        let shared = {
            let mut inflight = match self.inflight.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(running) = inflight.get(key) {
                running.clone()
            } else {
                let cache = self.clone();
                let task_key = key.clone();
                let upstream = fetch();
                let task = tokio::spawn(async move {
                    // Whatever happens to this task (even a panic), the key must not stay
                    // marked in flight, or every later query for it would wait on a dead fetch.
                    let _done = InflightGuard {
                        cache: cache.clone(),
                        key: task_key.clone(),
                    };
                    upstream.await.and_then(|msg| {
                        let now = Instant::now();
                        match CachedAnswer::from_message(&msg, &cache.policy, now) {
                            Some(entry) => {
                                let entry = Arc::new(entry);
                                if entry.cacheable {
                                    cache.entries.insert(task_key.clone(), entry.clone());
                                }
                                Ok(entry)
                            }
                            None => Err(FetchError::Rcode(msg.metadata.response_code)),
                        }
                    })
                });
                let shared: SharedFetch =
                    async move { task.await.unwrap_or(Err(FetchError::Aborted)) }
                        .boxed()
                        .shared();
                inflight.insert(key.clone(), shared.clone());
                shared
            }
        };
        shared.await
    }

    fn remove_inflight(&self, key: &Question) {
        // Called from a destructor too: never panic here.
        let mut inflight = match self.inflight.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        inflight.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{DNSClass, Name, RecordType};
    use std::str::FromStr;

    fn policy() -> TtlPolicy {
        TtlPolicy {
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(100),
            negative_ttl: Duration::from_secs(30),
            negative_min_ttl: Duration::ZERO,
            stale_for: Duration::from_secs(3600),
        }
    }

    fn reply(rcode: ResponseCode, a_ttls: &[u32], soa: Option<(u32, u32)>) -> Message {
        let name = Name::from_str("x.example.").expect("name");
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(name.clone(), RecordType::A));
        for (i, ttl) in a_ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                name.clone(),
                *ttl,
                RData::A(A::new(192, 0, 2, i as u8)),
            ));
        }
        if let Some((ttl, min)) = soa {
            let zone = Name::from_str("example.").expect("zone");
            m.add_authority(Record::from_rdata(
                zone.clone(),
                ttl,
                RData::SOA(SOA::new(zone.clone(), zone, 1, 2, 3, 4, min)),
            ));
        }
        m
    }

    #[test]
    fn positive_ttls_are_clamped_and_count_down() {
        let now = Instant::now();
        let e = CachedAnswer::from_message(
            &reply(ResponseCode::NoError, &[5, 50, 500], None),
            &policy(),
            now,
        )
        .expect("cacheable");
        let ttls: Vec<u32> = e.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, vec![10, 50, 100]);
        assert_eq!(e.ttl, Duration::from_secs(10));
        let later = e.to_answer(now + Duration::from_millis(3500), false);
        let ttls: Vec<u32> = later.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, vec![7, 47, 97]);
        assert!(e.is_fresh(now + Duration::from_secs(9)));
        assert!(!e.is_fresh(now + Duration::from_secs(10)));
        let stale = e.to_answer(now + Duration::from_secs(60), true);
        assert!(stale.answers.iter().all(|r| r.ttl == STALE_TTL));
    }

    #[test]
    fn negative_ttl_from_soa_minimum_capped() {
        let now = Instant::now();
        let e = CachedAnswer::from_message(
            &reply(ResponseCode::NXDomain, &[], Some((3600, 20))),
            &policy(),
            now,
        )
        .expect("cacheable");
        assert_eq!(e.ttl, Duration::from_secs(20));
        assert_eq!(e.authorities[0].ttl, 20);
        let e = CachedAnswer::from_message(
            &reply(ResponseCode::NoError, &[], Some((3600, 900))),
            &policy(),
            now,
        )
        .expect("cacheable");
        assert_eq!(e.ttl, Duration::from_secs(30), "capped by negative_ttl");
        let no_soa =
            CachedAnswer::from_message(&reply(ResponseCode::NXDomain, &[], None), &policy(), now)
                .expect("passed on");
        assert!(!no_soa.cacheable);
        assert!(CachedAnswer::from_message(
            &reply(ResponseCode::ServFail, &[], None),
            &policy(),
            now
        )
        .is_none());
    }

    #[tokio::test]
    async fn identical_concurrent_fetches_share_one() {
        let cache = Cache::new(100, policy(), None);
        let key = Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let key = key.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .fetch(&key, move || async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(reply(ResponseCode::NoError, &[60], None))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("join").is_ok());
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(matches!(
            cache.lookup(&key, Instant::now()),
            Lookup::Fresh(_)
        ));
    }

    #[tokio::test]
    async fn a_panicking_fetch_does_not_wedge_its_key() {
        let cache = Cache::new(100, policy(), None);
        let key = Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let first = cache
            .fetch(&key, || async {
                let r: Result<Message, FetchError> = Err(FetchError::Aborted);
                if r.is_err() {
                    panic!("a bug in a fetch");
                }
                r
            })
            .await;
        assert!(matches!(first, Err(FetchError::Aborted)));
        let second = cache
            .fetch(&key, || async {
                Ok(reply(ResponseCode::NoError, &[60], None))
            })
            .await;
        assert!(
            second.is_ok(),
            "the key is fetched again, not stuck on the dead fetch"
        );
    }
}
