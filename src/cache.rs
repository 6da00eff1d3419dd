//! The answer cache: one entry per (lowercased name, type, class), TTLs counting down on the way
//! out, negative answers kept per RFC 2308, expired entries kept a while longer so they can be
//! served stale when every upstream fails (RFC 8767), and concurrent identical misses merged into
//! one upstream query.
//!
//! Entries are kept in wire format (the question and the records as they follow it in a reply),
//! so a hit is answered by copying bytes and patching ID, flags, TTLs and the question's case
//! (`raw`), not by cloning and encoding records: little heap per cached name
//! (`benches/cache_memory.rs` measures it) and no encoding per hit.
//! The map is quick_cache (S3-FIFO, sharded, small bookkeeping per entry, weights in bytes; why
//! not moka is in ARCHITECTURE.md). Expiry is checked on read:
//! entries past their stale window are dropped when met, and the byte bound evicts the rest.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record};

use crate::answer::{Answer, Cut, Question};
use crate::header::{self, Section, HEADER_LEN};
use crate::lock::lock;
use crate::raw::{self, PlainQuery};
use crate::reply::{self, STALE_TTL};

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

/// What an entry costs beyond its bytes: the map's slot (the struct is held inline), the `Arc`
/// counts and allocator header of the bytes. Used for the byte bound, so it errs on the high side.
const ENTRY_OVERHEAD: usize = 112;

/// Room for keys recently evicted ("ghosts", which S3-FIFO admits straight to the hot set when
/// they come back), as a share of the entry count. quick_cache's default is 0.5, but a ghost
/// takes a whole slot (about 80 bytes here, the entry being held inline): at 100,000 entries
/// that was 4 MB of a 32 MiB budget. A tenth keeps the scan resistance for names asked again
/// soon after their eviction.
const GHOST_SHARE: f64 = 0.1;

/// A stored answer. Record TTLs are the clamped ones at `stored_at`.
///
/// Cheap to clone (the bytes are shared), and held in the map by value: one allocation per
/// entry (the bytes), not two (an `Arc` of the struct, then the bytes).
#[derive(Clone, Debug)]
pub struct CachedAnswer {
    pub(crate) rcode: ResponseCode,
    pub(crate) stored_at: Instant,
    /// How long the entry is fresh, in seconds.
    ttl_secs: u32,
    /// False for a negative answer without SOA: passed on to the client, never stored
    /// (RFC 2308 §5).
    pub(crate) cacheable: bool,
    /// Answer, authority and additional record counts.
    counts: [u16; 3],
    question_len: u16,
    /// The question (name lowercased) followed by the records, exactly as they follow a 12-byte
    /// header in a reply: names in the records may point into the question, so a reply must put
    /// the (same-length) question at the same place.
    wire: Arc<[u8]>,
}

/// The question in wire format, as the cache keys it: the name (already lowercased in a
/// `Question`), type and class.
pub(crate) fn question_wire(q: &Question) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw::MAX_QUESTION_WIRE);
    crate::reply::push_name(&mut out, &q.name);
    out.extend_from_slice(&u16::from(q.qtype).to_be_bytes());
    out.extend_from_slice(&u16::from(q.qclass).to_be_bytes());
    out
}

impl CachedAnswer {
    /// Turns an upstream reply to `q` into an entry. Error rcodes (SERVFAIL, REFUSED...) are never
    /// cached: they come back as `FetchError::Rcode`.
    pub fn from_message(
        q: &Question,
        msg: &Message,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<CachedAnswer, FetchError> {
        let clamp = |ttl: u32| -> u32 {
            let secs = u64::from(ttl).clamp(policy.min_ttl.as_secs(), policy.max_ttl.as_secs());
            u32::try_from(secs).unwrap_or(u32::MAX)
        };
        let rcode = msg.metadata.response_code;
        match rcode {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            other => return Err(FetchError::Rcode(other)),
        }
        let negative = rcode == ResponseCode::NXDomain || msg.answers.is_empty();
        let mut reply = Message::new(0, MessageType::Response, OpCode::Query);
        let mut query = Query::query(q.name.clone(), q.qtype);
        query.set_query_class(q.qclass);
        reply.add_query(query);
        let mut cacheable = true;
        let ttl_secs;
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
            ttl_secs = u32::try_from(secs).unwrap_or(u32::MAX);
            reply.answers = msg.answers.clone();
            // RFC 2308 §3: the SOA's TTL in a negative answer is the negative caching time.
            reply.authorities = msg
                .authorities
                .iter()
                .filter(|r| matches!(r.data, RData::SOA(_)))
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = ttl_secs;
                    r
                })
                .collect();
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
            reply.answers = clamped(&msg.answers);
            reply.authorities = clamped(&msg.authorities);
            reply.additionals = clamped(&msg.additionals);
            ttl_secs = reply.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        }
        let bytes = reply
            .to_vec()
            .map_err(|e| FetchError::Unstorable(e.to_string()))?;
        let [_, answers, authorities, additionals] = header::counts(&bytes).unwrap_or([0; 4]);
        let counts = [answers, authorities, additionals];
        let expected = [
            reply.answers.len(),
            reply.authorities.len(),
            reply.additionals.len(),
        ];
        // hickory stops at 64 KiB on its own, lowering the counts: such an answer is not stored
        // (it could not be sent whole anyway).
        if counts
            .iter()
            .zip(expected)
            .any(|(&c, e)| usize::from(c) != e)
        {
            return Err(FetchError::Unstorable("answer larger than 64 KiB".into()));
        }
        let question_len = question_wire(q).len();
        Ok(CachedAnswer {
            rcode,
            stored_at: now,
            ttl_secs,
            cacheable,
            counts,
            question_len: u16::try_from(question_len).unwrap_or(0),
            wire: bytes[HEADER_LEN..].into(),
        })
    }

    /// What the entry costs in memory, roughly.
    pub(crate) fn approx_bytes(&self) -> u32 {
        u32::try_from(ENTRY_OVERHEAD + self.wire.len()).unwrap_or(u32::MAX)
    }

    /// The question the entry answers (its cache key).
    pub(crate) fn question(&self) -> &[u8] {
        &self.wire[..usize::from(self.question_len)]
    }

    fn records(&self) -> &[u8] {
        &self.wire[usize::from(self.question_len)..]
    }

    /// How long the entry is fresh.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs))
    }

    /// Seconds since storing, rounded down.
    fn age_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.stored_at).as_secs()).unwrap_or(u32::MAX)
    }

    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored_at) < self.ttl()
    }

    /// The TTL rewrite for a reply at `now`: reduced by the entry's age (fresh), or 30 s (stale).
    fn ttl_at(&self, now: Instant, stale: bool) -> impl Fn(u32) -> u32 {
        let age = self.age_secs(now);
        move |ttl| {
            if stale {
                STALE_TTL
            } else {
                ttl.saturating_sub(age)
            }
        }
    }

    /// The answer as records, TTLs adjusted as for `write_reply` (the general path: truncation,
    /// shuffling records that cannot move as bytes).
    pub fn to_answer(&self, now: Instant, stale: bool) -> Answer {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.wire.len());
        let [answers, authorities, additionals] = self.counts;
        // Only the counts matter to the decoder; ID and flags are the reply's business.
        header::push(
            &mut bytes,
            0,
            header::QR,
            [1, answers, authorities, additionals],
        );
        bytes.extend_from_slice(&self.wire);
        let base = HEADER_LEN + usize::from(self.question_len);
        let total = self.counts.iter().map(|&c| usize::from(c)).sum();
        let decoded = raw::rewrite_ttls(&mut bytes[base..], total, base, self.ttl_at(now, stale))
            .then(|| Message::from_vec(&bytes).ok())
            .flatten();
        match decoded {
            Some(msg) => Answer {
                rcode: self.rcode,
                authoritative: false,
                answers: msg.answers,
                authorities: msg.authorities,
                additionals: msg.additionals,
                cut: Cut::default(),
            },
            // Bytes we encoded ourselves always decode; should they not, fail safe.
            None => Answer::servfail(),
        }
    }

    /// Writes the reply to `q` from this entry into `out`: header, the client's question (its
    /// case kept), the records with TTLs adjusted, the answer records shuffled when `shuffle`, and
    /// an OPT record when the query had one. Shuffled answers of addresses alone too large for
    /// `limit` (UDP) are cut to a random subset that fits, with TC=1. Returns false, with `out`
    /// in an unspecified state, when this must go the general way instead: any other reply
    /// that would exceed `limit`, or answers that cannot be shuffled as bytes.
    pub fn write_reply(
        &self,
        out: &mut Vec<u8>,
        q: &PlainQuery<'_>,
        limit: usize,
        now: Instant,
        stale: bool,
        shuffle: bool,
    ) -> bool {
        let opt_len = if q.edns_payload.is_some() {
            reply::OPT_LEN
        } else {
            0
        };
        if q.question.len() != usize::from(self.question_len) {
            return false;
        }
        let answers = usize::from(self.counts[0]);
        let shuffled = shuffle && answers > 1;
        let fits = HEADER_LEN + self.wire.len() + opt_len <= limit;
        // Too large for the client: cut here only an answer of shuffled addresses alone (a large
        // service through Consul's DNS interface), over UDP; the general path cuts the rest,
        // the same way (the largest prefix that fits, TC=1).
        let cut = !fits
            && shuffled
            && self.counts[1] == 0
            && self.counts[2] == 0
            && limit < reply::TCP_LIMIT;
        if !fits && !cut {
            return false;
        }
        out.clear();
        raw::write_header(out, q, false, self.rcode.low(), self.counts);
        out.extend_from_slice(q.question);
        let base = out.len();
        let records = self.records();
        let mut total: usize = self.counts.iter().map(|&c| usize::from(c)).sum();
        if shuffled {
            let room = if fits {
                usize::MAX
            } else {
                limit.saturating_sub(base + opt_len)
            };
            let mut rng = rand::rng();
            let Some((used, copied)) =
                raw::copy_shuffled_answers(out, records, answers, base, room, &mut rng)
            else {
                return false;
            };
            if copied < answers {
                // Only when cutting: nothing follows the answers.
                let copied_count = u16::try_from(copied).unwrap_or(u16::MAX);
                header::set_count(out, Section::Answer, copied_count);
                header::set_flags(out, header::TC);
                total = copied;
            } else {
                out.extend_from_slice(&records[used..]);
            }
        } else {
            out.extend_from_slice(records);
        }
        if !raw::rewrite_ttls(&mut out[base..], total, base, self.ttl_at(now, stale)) {
            return false;
        }
        if opt_len > 0 {
            raw::write_opt(out);
            raw::add_additional(out);
        }
        true
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
    #[error("upstream answer cannot be stored: {0}")]
    Unstorable(String),
}

/// The result of a fetch: the entry (stored when its `cacheable` flag says so; an uncacheable
/// answer is served to the waiting queries once), or why there is none.
pub(crate) type FetchResult = Result<CachedAnswer, FetchError>;

type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// Clears a key's in-flight mark when its fetch task ends, however it ends.
struct InflightGuard {
    cache: Cache,
    key: Box<[u8]>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.cache.remove_inflight(&self.key);
    }
}

/// What the cache holds for a key right now.
pub enum Lookup {
    Fresh(CachedAnswer),
    /// Expired but within `stale_for`: refresh, and serve this if the refresh fails.
    Expired(CachedAnswer),
    Miss,
}

/// Entries weigh their bytes, but at least `floor`, so the entry count stays bounded too.
#[derive(Clone)]
struct Weigh {
    floor: u64,
}

impl quick_cache::Weighter<u64, CachedAnswer> for Weigh {
    fn weight(&self, _key: &u64, value: &CachedAnswer) -> u64 {
        u64::from(value.approx_bytes()).max(self.floor)
    }
}

/// Counts entries evicted for space.
#[derive(Clone)]
struct Evictions(Option<prometheus::IntCounter>);

impl quick_cache::Lifecycle<u64, CachedAnswer> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: u64, _value: CachedAnswer) {
        if let Some(counter) = &self.0 {
            counter.inc();
        }
    }
}

type Map = quick_cache::sync::Cache<u64, CachedAnswer, Weigh, RandomState, Evictions>;

/// The cache. Cheap to clone (shared state).
///
/// Keyed by a keyed hash (random per process, so collisions cannot be chosen by clients) of the
/// question in wire format; the entry holds the question itself, so a lookup checks it and a
/// collision is a miss, never a wrong answer.
#[derive(Clone)]
pub struct Cache {
    entries: Arc<Map>,
    hasher: RandomState,
    inflight: Arc<Mutex<HashMap<Box<[u8]>, SharedFetch>>>,
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

    /// A cache bounded both in entries and in (approximate) bytes: each entry weighs its size in
    /// bytes but at least `max_bytes / max_entries`, so the total weight stays under `max_bytes`
    /// and the count under `max_entries`.
    pub(crate) fn with_limits(
        max_entries: u64,
        max_bytes: u64,
        policy: TtlPolicy,
        evictions: Option<prometheus::IntCounter>,
    ) -> Cache {
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(usize::try_from(max_entries).unwrap_or(usize::MAX))
            .weight_capacity(max_bytes.max(1))
            .ghost_allocation(GHOST_SHARE)
            .build();
        let entries = match options {
            Ok(options) => Map::with_options(
                options,
                Weigh { floor },
                RandomState::new(),
                Evictions(evictions.clone()),
            ),
            // Only reachable with a share outside [0, 1], which GHOST_SHARE is not.
            Err(_) => Map::with(
                usize::try_from(max_entries).unwrap_or(usize::MAX),
                max_bytes.max(1),
                Weigh { floor },
                RandomState::new(),
                Evictions(evictions),
            ),
        };
        Cache {
            entries: Arc::new(entries),
            hasher: RandomState::new(),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            policy,
        }
    }

    pub fn lookup(&self, key: &Question, now: Instant) -> Lookup {
        self.lookup_wire(&question_wire(key), now)
    }

    /// Looks up a question given in wire format with its name lowercased
    /// (`raw::question_key`).
    pub(crate) fn lookup_wire(&self, question: &[u8], now: Instant) -> Lookup {
        let hash = self.hasher.hash_one(question);
        match self.entries.get(&hash) {
            Some(entry) if entry.question() != question => Lookup::Miss,
            Some(entry) if entry.is_fresh(now) => Lookup::Fresh(entry),
            Some(entry)
                if now.saturating_duration_since(entry.stored_at)
                    < entry.ttl().saturating_add(self.policy.stale_for) =>
            {
                Lookup::Expired(entry)
            }
            Some(_) => {
                // Past its stale window: gone for good (unless refreshed meanwhile).
                self.entries.remove_if(&hash, |e: &CachedAnswer| {
                    now.saturating_duration_since(e.stored_at)
                        >= e.ttl().saturating_add(self.policy.stale_for)
                });
                Lookup::Miss
            }
            None => Lookup::Miss,
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    fn store(&self, entry: CachedAnswer) {
        let hash = self.hasher.hash_one(entry.question());
        self.entries.insert(hash, entry);
    }

    /// Runs `fetch` for `key` unless a fetch for the same key is already running, in which case
    /// its result is shared. The fetch runs in its own task, so a client giving up does not
    /// cancel it for the others. A cacheable result is stored before it is returned.
    pub async fn fetch<F, Fut>(&self, key: &Question, fetch: F) -> FetchResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Message, FetchError>> + Send + 'static,
    {
        let wire: Box<[u8]> = question_wire(key).into();
        let shared = {
            let mut inflight = lock(&self.inflight);
            if let Some(running) = inflight.get(&wire) {
                running.clone()
            } else {
                let cache = self.clone();
                let question = key.clone();
                let task_key = wire.clone();
                let upstream = fetch();
                let task = tokio::spawn(async move {
                    // Whatever happens to this task (even a panic), the key must not stay
                    // marked in flight, or every later query for it would wait on a dead fetch.
                    let _done = InflightGuard {
                        cache: cache.clone(),
                        key: task_key,
                    };
                    let msg = upstream.await?;
                    let entry =
                        CachedAnswer::from_message(&question, &msg, &cache.policy, Instant::now())?;
                    if entry.cacheable {
                        cache.store(entry.clone());
                    }
                    Ok(entry)
                });
                let shared: SharedFetch =
                    async move { task.await.unwrap_or(Err(FetchError::Aborted)) }
                        .boxed()
                        .shared();
                inflight.insert(wire, shared.clone());
                shared
            }
        };
        shared.await
    }

    fn remove_inflight(&self, key: &[u8]) {
        // Called from a destructor too: never panic here.
        let mut inflight = lock(&self.inflight);
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

    fn question() -> Question {
        Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        }
    }

    fn store(msg: &Message, now: Instant) -> Result<CachedAnswer, FetchError> {
        CachedAnswer::from_message(&question(), msg, &policy(), now)
    }

    fn ttls(records: &[Record]) -> Vec<u32> {
        records.iter().map(|r| r.ttl).collect()
    }

    #[test]
    fn positive_ttls_are_clamped_and_count_down() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[5, 50, 500], None), now).expect("cacheable");
        assert_eq!(ttls(&e.to_answer(now, false).answers), vec![10, 50, 100]);
        assert_eq!(e.ttl(), Duration::from_secs(10));
        let later = e.to_answer(now + Duration::from_millis(3500), false);
        assert_eq!(ttls(&later.answers), vec![7, 47, 97]);
        assert!(e.is_fresh(now + Duration::from_secs(9)));
        assert!(!e.is_fresh(now + Duration::from_secs(10)));
        let stale = e.to_answer(now + Duration::from_secs(60), true);
        assert!(stale.answers.iter().all(|r| r.ttl == STALE_TTL));
    }

    #[test]
    fn negative_ttl_from_soa_minimum_capped() {
        let now = Instant::now();
        let e =
            store(&reply(ResponseCode::NXDomain, &[], Some((3600, 20))), now).expect("cacheable");
        assert_eq!(e.ttl(), Duration::from_secs(20));
        assert_eq!(ttls(&e.to_answer(now, false).authorities), vec![20]);
        let e =
            store(&reply(ResponseCode::NoError, &[], Some((3600, 900))), now).expect("cacheable");
        assert_eq!(e.ttl(), Duration::from_secs(30), "capped by negative_ttl");
        let no_soa = store(&reply(ResponseCode::NXDomain, &[], None), now).expect("passed on");
        assert!(!no_soa.cacheable);
        assert!(matches!(
            store(&reply(ResponseCode::ServFail, &[], None), now),
            Err(FetchError::Rcode(ResponseCode::ServFail))
        ));
    }

    /// The bytes path and the general path (decode, then `reply::encode_reply`) must give the
    /// same reply: same header, the client's question case, same records and TTLs, same OPT.
    #[test]
    fn byte_replies_equal_the_general_path() {
        let now = Instant::now();
        let later = now + Duration::from_secs(4);
        for (msg, edns) in [
            (reply(ResponseCode::NoError, &[5, 50, 500], None), None),
            (reply(ResponseCode::NoError, &[60], None), Some(4096)),
            (
                reply(ResponseCode::NXDomain, &[], Some((3600, 20))),
                Some(512),
            ),
        ] {
            let e = store(&msg, now).expect("cacheable");
            let mut request = Message::query();
            request.metadata.id = 777;
            request.metadata.recursion_desired = true;
            request.metadata.checking_disabled = true;
            request.add_query(Query::query(
                Name::from_ascii("X.ExAmple.").expect("name"),
                RecordType::A,
            ));
            if let Some(size) = edns {
                let mut opt = hickory_proto::op::Edns::new();
                opt.set_max_payload(size);
                request.edns = Some(opt);
            }
            let bytes = request.to_vec().expect("encode");
            let plain = raw::parse_plain_query(&bytes).expect("plain");
            for stale in [false, true] {
                let mut fast = Vec::new();
                assert!(e.write_reply(&mut fast, &plain, 512, later, stale, false));
                let limit = crate::reply::reply_limit(&request, crate::reply::Transport::Udp);
                let (general, truncated) =
                    crate::reply::encode_reply(&request, &e.to_answer(later, stale), limit);
                assert!(!truncated);
                assert_eq!(
                    Message::from_vec(&fast).expect("fast decodes"),
                    Message::from_vec(&general).expect("general decodes"),
                    "edns {edns:?} stale {stale}"
                );
                assert_eq!(
                    &fast[12..12 + 13],
                    b"\x01X\x07ExAmple\x00\x00\x01",
                    "case kept"
                );
            }
            assert!(
                !e.write_reply(&mut Vec::new(), &plain, 20, later, false, false),
                "over limit"
            );
        }
    }

    /// `x.example. A`, without EDNS.
    fn a_query() -> Message {
        let mut request = Message::query();
        request.add_query(Query::query(
            Name::from_str("x.example.").expect("name"),
            RecordType::A,
        ));
        request
    }

    #[test]
    fn shuffled_byte_replies_keep_every_record_and_vary() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[60, 60, 60, 60], None), now).expect("ok");
        let request = a_query();
        let bytes = request.to_vec().expect("encode");
        let plain = raw::parse_plain_query(&bytes).expect("plain");
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut out = Vec::new();
            assert!(e.write_reply(&mut out, &plain, 512, now, false, true));
            let msg = Message::from_vec(&out).expect("decodes");
            let mut addrs: Vec<String> = msg.answers.iter().map(|r| r.data.to_string()).collect();
            firsts.insert(addrs[0].clone());
            addrs.sort();
            assert_eq!(addrs, ["192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        }
        assert!(firsts.len() > 1, "the order changes");
    }

    /// A large service through Consul's DNS interface: more addresses than a UDP reply holds.
    /// The bytes path cuts them as the general path does (as many as fit, TC=1), to a random
    /// subset; over TCP everything fits and nothing is cut.
    #[test]
    fn shuffled_addresses_too_many_for_udp_are_cut_to_a_random_subset() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[60; 100], None), now).expect("ok");
        let request = a_query();
        let bytes = request.to_vec().expect("encode");
        let plain = raw::parse_plain_query(&bytes).expect("plain");
        let (general, truncated) = reply::encode_reply(&request, &e.to_answer(now, false), 512);
        assert!(truncated);
        let general = Message::from_vec(&general).expect("general decodes");
        let mut kept = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut out = Vec::new();
            assert!(e.write_reply(&mut out, &plain, 512, now, false, true));
            assert!(out.len() <= 512);
            let msg = Message::from_vec(&out).expect("decodes");
            assert!(msg.metadata.truncation, "TC=1: TCP gives more");
            assert_eq!(msg.answers.len(), general.answers.len(), "as many as fit");
            assert!(msg.answers.iter().all(|r| r.ttl == 60));
            kept.extend(msg.answers.iter().map(|r| r.data.to_string()));
        }
        assert!(
            kept.len() > general.answers.len(),
            "a different subset each time"
        );
        let mut out = Vec::new();
        assert!(e.write_reply(&mut out, &plain, reply::TCP_LIMIT, now, false, true));
        let msg = Message::from_vec(&out).expect("decodes");
        assert!(!msg.metadata.truncation);
        assert_eq!(msg.answers.len(), 100);
        // Not shuffled (an upstream answer): too large goes the general way.
        assert!(!e.write_reply(&mut Vec::new(), &plain, 512, now, false, false));
    }

    #[test]
    fn lookups_check_the_question_and_drop_entries_past_their_stale_window() {
        let cache = Cache::new(100, policy(), None);
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[10], None), now).expect("ok");
        cache.store(e);
        assert!(matches!(cache.lookup(&question(), now), Lookup::Fresh(_)));
        let mut other = question();
        other.qtype = RecordType::AAAA;
        assert!(matches!(cache.lookup(&other, now), Lookup::Miss));
        let expired = now + Duration::from_secs(11);
        assert!(matches!(
            cache.lookup(&question(), expired),
            Lookup::Expired(_)
        ));
        let gone = now + Duration::from_secs(10 + 3600 + 1);
        assert!(matches!(cache.lookup(&question(), gone), Lookup::Miss));
        assert_eq!(cache.entry_count(), 0, "removed when met past its window");
    }

    #[test]
    fn the_byte_bound_evicts_and_counts() {
        let counter = prometheus::IntCounter::new("e", "e").expect("counter");
        let cache = Cache::with_limits(10_000, 64 * 1024, policy(), Some(counter.clone()));
        let now = Instant::now();
        for i in 0..5_000u32 {
            let q = Question {
                name: Name::from_str(&format!("n{i}.example.")).expect("name"),
                qtype: RecordType::A,
                qclass: DNSClass::IN,
            };
            let e = CachedAnswer::from_message(
                &q,
                &reply(ResponseCode::NoError, &[60], None),
                &policy(),
                now,
            )
            .expect("ok");
            cache.store(e);
        }
        assert!(
            cache.entry_count() < 1_000,
            "{} entries in 64 KiB",
            cache.entry_count()
        );
        assert!(
            counter.get() > 4_000,
            "evictions counted: {}",
            counter.get()
        );
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
