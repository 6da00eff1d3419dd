//! How a view without a blocking query of its own is known to be current without asking Consul
//! again: its datacenter's change feeds (health) and catalog lists (instances, node addresses)
//! are all alive, and the view has missed nothing they reported since it was fetched.
//!
//! A view beyond the blocking budget used to be fetched again whenever it was asked after its
//! TTL, although the feeds already patch its health within a second and a catalog change
//! already fetches it again: at 10,000 services most of Consul's load (and of ours) was those
//! refetches, and such views could never be answered from pre-encoded bytes. Now the TTL only
//! matters while a feed or list is down.
//!
//! Each feed or list publishes a [`ListPulse`]: its last `X-Consul-Index` and when it last
//! answered (cleared when it fails). A change feed also counts its rounds ([`FeedPulse`]):
//! every result bumps the count before the views are patched. A view records, when its
//! watcher's request starts, the round and both catalog indexes ([`Basis`]), and keeps them
//! once the fetched view is installed, if no round went by meanwhile (a round in between may
//! or may not be in the fetch). Each later round the feeds apply to the view moves its round on
//! ([`Freshness::advance`]); a round that cannot apply (the view lacks a changed instance, or
//! has a blocking query and is skipped) leaves it behind. So the view is current when its
//! round is the feed's, its indexes are the lists', and every pulse is alive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::atomic_instant::AtomicInstant;

/// The longest pause of a feed or list between two requests (`inventory::LIST_POLL`, the
/// longest of them), on top of a blocking request's own time.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// A round no feed ever reaches: the view is not known to follow its feed.
const BEHIND: u64 = u64::MAX;

/// What one blocking list (a change feed, a catalog list) last said: its index and when.
#[derive(Default)]
pub(crate) struct ListPulse {
    index: AtomicU64,
    answered: AtomicInstant,
}

impl ListPulse {
    /// A result with `index` came at `now`.
    pub(super) fn beat(&self, index: u64, now: Instant) {
        self.index.store(index, Ordering::SeqCst);
        self.answered.store(now);
    }

    /// A request failed: nothing the list said holds any more.
    pub(super) fn fail(&self) {
        self.answered.clear();
    }

    pub(super) fn index(&self) -> u64 {
        self.index.load(Ordering::SeqCst)
    }

    /// Answered within `within` of `now`: its blocking query is outstanding, or it is between
    /// two requests.
    fn alive(&self, now: Instant, within: Duration) -> bool {
        self.answered
            .load()
            .is_some_and(|at| now.saturating_duration_since(at) <= within)
    }
}

/// The bounds on the feeds' word.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vouching {
    /// How recently every feed and list must have answered: a blocking request's longest time
    /// (`client::blocking_timeout`) and the longest pause before the next one.
    pub(crate) alive_within: Duration,
    /// How old a view's fetch may be. Past it the view goes back to its TTL however current the
    /// feeds say it is, so a change they missed (a node changed before the node list's first
    /// answer, or anything unforeseen) lasts at most this long. `consul.watch_wait`: as often
    /// as a blocking query is asked again when nothing changes.
    pub(crate) refetch_after: Duration,
}

impl Vouching {
    pub(crate) fn new(watch_wait: Duration, blocking_timeout: Duration) -> Vouching {
        Vouching {
            alive_within: blocking_timeout + LONGEST_PAUSE,
            refetch_after: watch_wait,
        }
    }
}

/// A datacenter's pair of change feeds: their pulses, and how many results they delivered.
#[derive(Default)]
pub(crate) struct FeedPulse {
    rounds: AtomicU64,
    /// One per list of `feed::FEED_STATES`.
    pub(super) lists: [ListPulse; 2],
}

impl FeedPulse {
    /// Counts a result about to be applied to the views; returns its round.
    pub(super) fn next_round(&self) -> u64 {
        self.rounds.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn round(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }
}

/// A datacenter's catalog lists, as the inventory keeps them: `/v1/catalog/services` (moves
/// with every registration, deregistration and instance change) and `/v1/catalog/nodes`
/// (every node change, its address included).
#[derive(Default)]
pub(crate) struct CatalogPulse {
    pub(super) services: ListPulse,
    pub(super) nodes: ListPulse,
}

/// What a fetch was based on: the feed's round and the catalog indexes when it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Basis {
    round: u64,
    services: u64,
    nodes: u64,
}

/// The pulses one view follows (set once, when its watch starts).
pub(crate) struct Sources {
    pub(super) feed: Arc<FeedPulse>,
    pub(super) catalog: Arc<CatalogPulse>,
}

/// One view's standing against its feeds and catalog lists.
pub(crate) struct Freshness {
    sources: OnceLock<Sources>,
    round: AtomicU64,
    services: AtomicU64,
    nodes: AtomicU64,
    /// `X-Consul-Index` of the fetch the basis was installed with (0: unknown): a list index at
    /// or below it is a change that fetch already holds.
    fetched: AtomicU64,
    /// When the view of the basis was installed.
    based_at: AtomicInstant,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            sources: OnceLock::new(),
            round: AtomicU64::new(BEHIND),
            services: AtomicU64::new(0),
            nodes: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            based_at: AtomicInstant::none(),
        }
    }
}

impl Freshness {
    /// Follows `sources` from now on (only the first call counts: a view's datacenter does not
    /// change).
    pub(super) fn follow(&self, sources: Sources) {
        let _ = self.sources.set(sources);
    }

    /// What a request starting now is based on; `None` for a view no feed patches.
    pub(super) fn basis(&self) -> Option<Basis> {
        let s = self.sources.get()?;
        Some(Basis {
            round: s.feed.round(),
            services: s.catalog.services.index(),
            nodes: s.catalog.nodes.index(),
        })
    }

    /// The view fetched on `basis`, whose response had `X-Consul-Index` `fetched_index`, is
    /// installed: it follows the feed from `basis` on, unless a round went by during the fetch.
    /// A catalog list that moves during the fetch to an index no higher than `fetched_index`
    /// reports a change the fetch already holds (Consul read its state at an index at least as
    /// high), so the view stays current through it.
    pub(super) fn settle(&self, basis: Option<Basis>, fetched_index: u64) {
        // Behind first: a reader never pairs the old round with the new indexes.
        self.round.store(BEHIND, Ordering::SeqCst);
        let (Some(basis), Some(s)) = (basis, self.sources.get()) else {
            return;
        };
        if s.feed.round() != basis.round {
            return;
        }
        self.services.store(basis.services, Ordering::SeqCst);
        self.nodes.store(basis.nodes, Ordering::SeqCst);
        self.fetched.store(fetched_index, Ordering::SeqCst);
        self.based_at.store(Instant::now());
        self.round.store(basis.round, Ordering::SeqCst);
    }

    /// Round `round` was applied to the view (patched, or nothing of it changed).
    pub(super) fn advance(&self, round: u64) {
        let _ = self.round.compare_exchange(
            round.wrapping_sub(1),
            round,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Round `round` recomputed the view's whole health from complete lists.
    pub(super) fn caught_up(&self, round: u64) {
        self.round.store(round, Ordering::SeqCst);
    }

    /// The view missed a change (it is being fetched again).
    pub(super) fn fall_behind(&self) {
        self.round.store(BEHIND, Ordering::SeqCst);
    }

    /// Is the view current at `now` without asking Consul: every pulse alive, every round
    /// applied, no catalog change since its fetch, and that fetch not too old?
    pub(super) fn current(&self, now: Instant, limits: Vouching) -> bool {
        let Some(s) = self.sources.get() else {
            return false;
        };
        let within = limits.alive_within;
        let round = self.round.load(Ordering::SeqCst);
        let fetched = self.fetched.load(Ordering::SeqCst);
        round != BEHIND
            && round == s.feed.round()
            && same_index(&self.services, &s.catalog.services, fetched)
            && same_index(&self.nodes, &s.catalog.nodes, fetched)
            && self
                .based_at
                .load()
                .is_some_and(|at| now.saturating_duration_since(at) <= limits.refetch_after)
            && s.feed.lists.iter().all(|l| l.alive(now, within))
            && s.catalog.services.alive(now, within)
            && s.catalog.nodes.alive(now, within)
    }
}

/// Is the list's index the one the view was fetched on, or one its fetch already holds (no
/// higher than the fetch's own `X-Consul-Index`, `fetched`)? A view fetched before the list
/// first answered (index 0: at start-up the node list of a large catalog comes after the first
/// views) takes the first index it sees as its own: a change in between is missed for at most
/// `Vouching::refetch_after`, where refetching every such view would double a cold start's
/// fetches.
fn same_index(seen: &AtomicU64, list: &ListPulse, fetched: u64) -> bool {
    let now = list.index();
    match seen.load(Ordering::SeqCst) {
        0 if now != 0 => {
            let _ = seen.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
            seen.load(Ordering::SeqCst) == now
        }
        // A list gone back (a restored snapshot, another cluster) is no move the fetch holds.
        held => held == now || (held < now && now <= fetched),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHIN: Duration = Duration::from_secs(10);
    const LIMITS: Vouching = Vouching {
        alive_within: WITHIN,
        refetch_after: Duration::from_secs(300),
    };

    /// A view following live pulses, fetched on the current basis.
    fn followed() -> (Freshness, Arc<FeedPulse>, Arc<CatalogPulse>, Instant) {
        followed_with_nodes(true)
    }

    /// [`followed`], the node list having answered or not yet.
    fn followed_with_nodes(
        nodes_answered: bool,
    ) -> (Freshness, Arc<FeedPulse>, Arc<CatalogPulse>, Instant) {
        let now = Instant::now();
        let feed = Arc::new(FeedPulse::default());
        let catalog = Arc::new(CatalogPulse::default());
        for l in &feed.lists {
            l.beat(7, now);
        }
        catalog.services.beat(10, now);
        if nodes_answered {
            catalog.nodes.beat(20, now);
        }
        let f = Freshness::default();
        f.follow(Sources {
            feed: feed.clone(),
            catalog: catalog.clone(),
        });
        let basis = f.basis();
        f.settle(basis, 0);
        (f, feed, catalog, now)
    }

    #[test]
    fn a_view_fetched_between_rounds_is_current_while_every_pulse_lives() {
        let (f, feed, catalog, now) = followed();
        assert!(f.current(now, LIMITS));
        // Too long since a list answered.
        assert!(!f.current(now + WITHIN + Duration::from_secs(1), LIMITS));
        // A failed feed, then back.
        feed.lists[1].fail();
        assert!(!f.current(now, LIMITS));
        feed.lists[1].beat(8, now);
        assert!(
            f.current(now, LIMITS),
            "a list's index alone is not a change"
        );
        catalog.nodes.fail();
        assert!(!f.current(now, LIMITS));
    }

    #[test]
    fn rounds_applied_keep_it_current_and_a_missed_one_does_not() {
        let (f, feed, _, now) = followed();
        let r = feed.next_round();
        assert!(!f.current(now, LIMITS), "a round not yet applied");
        f.advance(r);
        assert!(f.current(now, LIMITS));
        // A round skipped (the view had a blocking query then): the next one cannot advance it.
        let _skipped = feed.next_round();
        let r = feed.next_round();
        f.advance(r);
        assert!(!f.current(now, LIMITS));
        // A first list recomputes every status: current again.
        f.caught_up(r);
        assert!(f.current(now, LIMITS));
        f.fall_behind();
        f.advance(r + 1);
        assert!(!f.current(now, LIMITS), "behind stays behind");
    }

    #[test]
    fn a_fetch_during_a_round_or_before_a_catalog_change_is_not_current() {
        let (f, feed, catalog, now) = followed();
        let basis = f.basis();
        feed.next_round();
        f.settle(basis, 0);
        assert!(!f.current(now, LIMITS), "the round may not be in the fetch");
        let basis = f.basis();
        f.settle(basis, 0);
        assert!(f.current(now, LIMITS));
        catalog.services.beat(11, now);
        assert!(!f.current(now, LIMITS), "an instance registered since");
        let basis = f.basis();
        f.settle(basis, 0);
        assert!(f.current(now, LIMITS));
        catalog.nodes.beat(21, now);
        assert!(!f.current(now, LIMITS), "a node changed since");
    }

    #[test]
    fn a_list_move_the_fetch_already_holds_is_no_change() {
        let (f, _, catalog, now) = followed();
        // Asked on the node list's move (services at 10); Consul answered at index 12, after
        // an instance was registered (11) and deregistered (12).
        let basis = f.basis();
        f.settle(basis, 12);
        assert!(f.current(now, LIMITS));
        catalog.services.beat(11, now);
        assert!(f.current(now, LIMITS), "registered before the fetch read");
        catalog.services.beat(12, now);
        assert!(f.current(now, LIMITS), "deregistered before the fetch read");
        catalog.services.beat(13, now);
        assert!(!f.current(now, LIMITS), "a change after the fetch");
        catalog.services.beat(9, now);
        assert!(!f.current(now, LIMITS), "a list gone back");
    }

    #[test]
    fn an_old_fetch_goes_back_to_its_ttl() {
        let (f, feed, catalog, now) = followed();
        // Every list answers on, with nothing new.
        let later = now + LIMITS.refetch_after;
        for l in feed.lists.iter().chain([&catalog.services, &catalog.nodes]) {
            l.beat(l.index(), later);
        }
        assert!(f.current(later, LIMITS));
        assert!(!f.current(later + Duration::from_secs(1), LIMITS));
    }

    #[test]
    fn a_list_that_had_not_answered_is_taken_at_its_first_index() {
        let (f, _, catalog, now) = followed_with_nodes(false);
        assert!(!f.current(now, LIMITS), "the node list has not answered");
        catalog.nodes.beat(20, now);
        assert!(f.current(now, LIMITS), "its first index is the view's");
        catalog.nodes.beat(21, now);
        assert!(!f.current(now, LIMITS), "a later change is one");
    }

    #[test]
    fn a_view_without_feeds_is_never_current_by_them() {
        let f = Freshness::default();
        assert_eq!(f.basis(), None);
        f.settle(None, 0);
        assert!(!f.current(Instant::now(), LIMITS));
    }
}
