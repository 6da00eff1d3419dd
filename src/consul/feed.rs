//! The datacenter-wide health change feeds: blocking queries on `/v1/health/state/critical` and
//! `/warning` of one datacenter, whose successive results are diffed to find the services whose
//! health changed; the views of that datacenter without a blocking query of their own are
//! patched from the lists (or, when a patch cannot be exact, fetched again). The local
//! datacenter's feeds run from its first view on; another datacenter's run while it has views
//! (see [`FeedScope`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::catalog::{service_id_key, Instance, ServiceView, Status};
use super::client::{next_index, ClientError, ConsulClient};
use super::freshness::FeedPulse;
use super::name::{ServiceKind, ViewKey};
use super::outage::OutageLog;
use super::retry::backoff;
use super::views::{ServiceSeries, ViewState, Watch, WatchMap};
use crate::lock::lock;
use crate::metrics::Metrics;

/// Shortest time between the starts of two requests of one change feed. Under churn (Consul
/// answers a blocking query on a check state at once when any check anywhere changed) this
/// is the feed's period: it bounds our load on Consul and the CPU spent decoding and diffing
/// the state lists, at the price of up to this much added delay between a flip and its view's
/// refresh (the target is under 2 s). When nothing changes the blocking query just waits.
pub(super) const FEED_INTERVAL: Duration = Duration::from_millis(500);

/// How long a feed waits before asking again after the agent refused the endpoint (404, or
/// 403 without `node:read`/`service:read` on everything): views then refresh on their TTL.
pub(super) const FEED_UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// The check states the feeds watch. DNS cares about every status transition: critical
/// instances are never served, warning ones are served unless `only_passing`, with their
/// warning weight. A check in neither list is passing, so the two lists are the whole health
/// picture, and they are small compared to `/v1/health/state/any` (every check). The order is
/// the order of [`HealthLists::lists`].
pub(super) const FEED_STATES: [&str; 2] = ["critical", "warning"];

/// Which datacenter's feeds patch a view: `None` for the local datacenter (asked without a
/// datacenter label, or with the local one's name), else the remote datacenter's name.
pub(super) type FeedScope = Option<String>;

/// The feed scope of `key`, or `None` for views no feed can patch: the state lists hold the
/// default namespace and partition of one datacenter (not a peer's), and name the checks' own
/// services (a sidecar's checks name the sidecar, not the service its `.connect` view is asked
/// by). `local_dc` is the agent's datacenter, once known.
pub(super) fn feed_scope(key: &ViewKey, local_dc: Option<&str>) -> Option<FeedScope> {
    if key.kind != ServiceKind::Service || !key.tenancy.is_default() {
        return None;
    }
    Some(match key.dc.as_deref() {
        Some(dc) if !local_dc.is_some_and(|local| local.eq_ignore_ascii_case(dc)) => {
            Some(dc.to_ascii_lowercase())
        }
        _ => None,
    })
}

/// One entry of `/v1/health/state/<state>`: which check, where, and its last write.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StateCheckJson {
    pub(super) node: String,
    #[serde(rename = "CheckID", default)]
    pub(super) check_id: String,
    /// Empty (or absent) for a node check, which affects every service on the node.
    #[serde(rename = "ServiceID", default)]
    pub(super) service_id: Option<String>,
    #[serde(default)]
    pub(super) service_name: Option<String>,
    #[serde(default)]
    pub(super) modify_index: u64,
}

/// What a feed remembers of a check in its state: enough to tell a rewrite, to name the views
/// it affects once it leaves the state, and to find the instance it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SeenCheck {
    pub(super) modify_index: u64,
    /// Lowercased service name; `None` for a node check.
    pub(super) service: Option<String>,
    /// [`service_id_key`] of the check's `ServiceID` (0 for a node check).
    pub(super) service_id: u64,
}

impl SeenCheck {
    /// Does this check (listed on the instance's node) count towards the instance's health?
    /// Node checks count for every instance on the node.
    pub(super) fn applies_to(&self, instance: &Instance) -> bool {
        self.service.is_none() || self.service_id == instance.service_id
    }
}

/// The checks in one state: lowercased node -> check ID -> what was seen.
pub(super) type SeenChecks = HashMap<String, HashMap<String, SeenCheck>>;

pub(super) fn seen_checks(list: Vec<StateCheckJson>) -> SeenChecks {
    let mut out: SeenChecks = HashMap::new();
    for c in list {
        let service_id = c.service_id.filter(|id| !id.is_empty());
        let seen = SeenCheck {
            modify_index: c.modify_index,
            service_id: service_id.as_deref().map_or(0, service_id_key),
            service: service_id.map(|_| c.service_name.unwrap_or_default().to_ascii_lowercase()),
        };
        out.entry(c.node.to_ascii_lowercase())
            .or_default()
            .insert(c.check_id, seen);
    }
    out
}

/// The checks one round of a feed found changed, by what they affect.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    /// Service -> the instances whose service checks changed, as (node, service ID key).
    pub(super) services: HashMap<String, HashSet<(String, u64)>>,
    /// Nodes whose node checks changed.
    pub(super) nodes: HashSet<String>,
}

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.services.is_empty() && self.nodes.is_empty()
    }

    pub(super) fn note(&mut self, node: &str, seen: &SeenCheck) {
        match &seen.service {
            Some(s) => {
                self.services
                    .entry(s.clone())
                    .or_default()
                    .insert((node.to_owned(), seen.service_id));
            }
            None => {
                self.nodes.insert(node.to_owned());
            }
        }
    }
}

/// The checks that entered the state, left it, or were rewritten in it (a new `ModifyIndex`:
/// the check may have been elsewhere in between, which a view fetched meanwhile may show).
pub(super) fn diff(old: &SeenChecks, new: &SeenChecks) -> Changes {
    let mut changes = Changes::default();
    for (node, checks) in new {
        let before = old.get(node);
        for (id, seen) in checks {
            if before.and_then(|b| b.get(id)) != Some(seen) {
                changes.note(node, seen);
            }
        }
    }
    for (node, checks) in old {
        let after = new.get(node);
        for (id, seen) in checks {
            if !after.is_some_and(|a| a.contains_key(id)) {
                changes.note(node, seen);
            }
        }
    }
    changes
}

/// The latest list of each feed (`None` until its first result and after a failure).
#[derive(Default)]
pub(super) struct HealthLists {
    pub(super) lists: [Option<SeenChecks>; FEED_STATES.len()],
}

impl HealthLists {
    /// Every non-passing check of the datacenter, when both lists are known.
    pub(super) fn complete(&self) -> Option<[&SeenChecks; FEED_STATES.len()]> {
        let [critical, warning] = &self.lists;
        Some([critical.as_ref()?, warning.as_ref()?])
    }
}

/// An instance's status by the feeds' lists: critical when one of its checks (its service's
/// or its node's) is in the critical list, else warning when one is in the warning list, else
/// passing (every check in neither list is passing).
pub(super) fn listed_status(
    lists: [&SeenChecks; FEED_STATES.len()],
    instance: &Instance,
) -> Status {
    let [critical, warning] = lists;
    let listed_in = |list: &SeenChecks| {
        list.get(&*instance.node)
            .is_some_and(|checks| checks.values().any(|c| c.applies_to(instance)))
    };
    if listed_in(critical) {
        Status::Critical
    } else if listed_in(warning) {
        Status::Warning
    } else {
        Status::Passing
    }
}

/// `view` with every instance's status recomputed from the lists, or `None` when nothing
/// changes.
pub(super) fn patched(
    view: &ServiceView,
    lists: [&SeenChecks; FEED_STATES.len()],
) -> Option<ServiceView> {
    let mut changed = false;
    let instances = view
        .instances
        .iter()
        .map(|inst| {
            let status = listed_status(lists, inst);
            changed |= status != inst.status;
            Instance {
                status,
                ..inst.clone()
            }
        })
        .collect();
    changed.then(|| {
        let mut patched = ServiceView::new(instances, &view.datacenter);
        patched.virtual_ip = view.virtual_ip;
        patched
    })
}

/// What the feeds of one datacenter need to reach its views.
#[derive(Clone)]
pub(super) struct FeedShared {
    /// The datacenter whose views these feeds patch.
    pub(super) scope: FeedScope,
    /// The agent's datacenter once known: views asked with its name are local ones.
    pub(super) local_dc: Arc<Mutex<Option<String>>>,
    pub(super) watches: WatchMap,
    pub(super) lists: Arc<Mutex<HealthLists>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) series: Arc<ServiceSeries>,
    pub(super) only_passing: bool,
    /// The feeds' rounds and liveness, which views follow to stay current without a refetch
    /// (see `freshness`).
    pub(super) pulse: Arc<FeedPulse>,
}

/// How one round of the feeds touched the views.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub(super) patched: usize,
    pub(super) refreshed: usize,
}

impl FeedShared {
    /// Brings the views without a blocking query up to date with the lists: every one of them
    /// when `changes` is `None` (a feed's first result), else those named by `changes`. A view
    /// is patched in place when every changed check belongs to an instance it has (each
    /// instance's status follows from the lists); a view that lacks one (an instance
    /// registered since its fetch), or any view while a list is missing, is refreshed with one
    /// fetch instead.
    ///
    /// Each call is one round of [`FeedPulse`], counted under the lists' lock (so rounds are
    /// applied in their order); every view brought up to date follows the round, a view to be
    /// fetched again falls behind (see `freshness`).
    pub(super) fn apply(&self, changes: Option<&Changes>) -> Applied {
        if changes.is_some_and(Changes::is_empty) {
            // Not a round: the list is what it was (a feed polling without a blocking slot
            // gets the same list twice a second), so no fetch in flight can lack anything.
            return Applied::default();
        }
        let local_dc = lock(&self.local_dc).clone();
        let lists = lock(&self.lists);
        let round = self.pulse.next_round();
        let complete = lists.complete();
        let watches = lock(&self.watches);
        let mut applied = Applied::default();
        for (key, w) in watches.iter() {
            if !w.on_demand.load(Ordering::SeqCst)
                || feed_scope(key, local_dc.as_deref()).as_ref() != Some(&self.scope)
            {
                continue;
            }
            let service = key.service.as_str();
            let current = match &*w.state.borrow() {
                ViewState::Ready(view) => Some(view.clone()),
                _ => None,
            };
            let Some(view) = current else {
                continue;
            };
            let knows_all = match changes {
                None => true,
                Some(c) => match affects(c, service, &view) {
                    Affected::No => {
                        self.settle(key, w, &view, None, Follow::Advance(round));
                        continue;
                    }
                    Affected::Known => true,
                    Affected::Unknown => false,
                },
            };
            match complete {
                Some(lists) if knows_all => {
                    let new = patched(&view, lists);
                    applied.patched += usize::from(new.is_some());
                    // A first list recomputes every status: the view is caught up whatever
                    // rounds it missed.
                    let follow = match changes {
                        None => Follow::CaughtUp(round),
                        Some(_) => Follow::Advance(round),
                    };
                    self.settle(key, w, &view, new, follow);
                }
                // Only a diff says something happened; without one there is nothing to fetch.
                _ if changes.is_some() => {
                    w.freshness.fall_behind();
                    w.changed.notify_one();
                    applied.refreshed += 1;
                }
                // A first list while the other is missing: nothing to apply, and the other's
                // first list recomputes every status.
                _ => self.settle(key, w, &view, None, Follow::Advance(round)),
            }
        }
        applied
    }

    /// Unless the watcher replaced `old` meanwhile (its fetch is newer, and its own basis says
    /// whether it follows the feed): replaces it by `new` if given, and records the round.
    /// Both happen under the state channel's lock, which the watcher's install takes too, so a
    /// round is never recorded for a view it was not applied to.
    fn settle(
        &self,
        key: &ViewKey,
        w: &Watch,
        old: &Arc<ServiceView>,
        new: Option<ServiceView>,
        follow: Follow,
    ) {
        let healthy = new.as_ref().map(|n| n.healthy_count(self.only_passing));
        let mut new = new.map(Arc::new);
        let replaced = w.state.send_if_modified(|state| match state {
            ViewState::Ready(current) if Arc::ptr_eq(current, old) => {
                match follow {
                    Follow::Advance(round) => w.freshness.advance(round),
                    Follow::CaughtUp(round) => w.freshness.caught_up(round),
                }
                match new.take() {
                    Some(new) => {
                        *state = ViewState::Ready(new);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        });
        if let (true, Some(healthy)) = (replaced, healthy) {
            self.metrics.consul_health_changes.inc();
            self.series
                .set(key.service.as_str(), key.is_plain_local(), w, healthy);
        }
    }
}

/// How a round applied to a view moves its standing (see `freshness::Freshness`).
#[derive(Clone, Copy)]
enum Follow {
    /// The view was up to date with the round before, so it is with this one.
    Advance(u64),
    /// Every status was recomputed from complete lists.
    CaughtUp(u64),
}

pub(super) enum Affected {
    No,
    /// Changed, and every changed check belongs to an instance of the view: a patch is exact.
    Known,
    /// Changed, through a service check of an instance the view does not have (registered
    /// since its fetch, perhaps just turned healthy).
    Unknown,
}

pub(super) fn affects(changes: &Changes, service: &str, view: &ServiceView) -> Affected {
    let mut affected = false;
    if let Some(changed) = changes.services.get(service) {
        affected = true;
        let has = |(node, service_id): &(String, u64)| {
            view.instances
                .iter()
                .any(|i| i.service_id == *service_id && *i.node == **node)
        };
        if !changed.iter().all(has) {
            return Affected::Unknown;
        }
    }
    if !affected && !changes.nodes.is_empty() {
        affected = view
            .instances
            .iter()
            .any(|i| changes.nodes.contains(&*i.node));
    }
    if affected {
        Affected::Known
    } else {
        Affected::No
    }
}

/// A datacenter-wide change feed: a blocking query on `/v1/health/state/<state>` of one
/// datacenter ([`FeedShared::scope`]), at most one request per [`FEED_INTERVAL`]. Each result is diffed with the one
/// before, and the views whose health changed and which have no blocking query of their own
/// are patched from the lists (see [`FeedShared::apply`]). So every view, not only the ones
/// within the blocking budget, follows health changes within about one interval, with one
/// connection per feed and no request per change.
pub(super) struct Feed {
    pub(super) state: &'static str,
    /// This feed's place in [`HealthLists::lists`].
    pub(super) list: usize,
    pub(super) client: Arc<ConsulClient>,
    /// A feed's answer ends an outage as a watcher's does: after an agent restart the feed
    /// may be the first to get through, and the "reachable again" line must not wait for
    /// the next probe.
    pub(super) outage: Arc<OutageLog>,
    pub(super) shared: FeedShared,
    pub(super) watch_wait: Duration,
    pub(super) shutdown: CancellationToken,
    pub(super) failovers: watch::Receiver<u64>,
}

impl Feed {
    pub(super) async fn run(mut self) {
        self.keep().await;
        // Stopped: views that follow this feed go back to their TTL.
        self.shared.pulse.lists[self.list].fail();
    }

    async fn keep(&mut self) {
        let segments = ["v1", "health", "state", self.state];
        let params: Vec<(&str, String)> = match &self.shared.scope {
            Some(dc) => vec![("dc", dc.clone())],
            None => Vec::new(),
        };
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        let mut refused_logged = false;
        // The feed keeps its blocking slot from one request to the next: given back after
        // each, it went to a service watcher, and the feed then polled every FEED_INTERVAL
        // while nothing changed (two requests a second to the agent for nothing).
        let mut slot = None;
        loop {
            let started = Instant::now();
            // One of the slots kept for lists and feeds (`client::SHARED_BLOCKING_SLOTS`), taken
            // from the start. Without a free one (a tiny budget, or many datacenters' feeds)
            // the feed polls instead.
            if slot.is_none() {
                slot = self.client.try_shared_slot();
            }
            // The first request (index 0) is a plain one, slot or not.
            let blocking = slot
                .as_ref()
                .filter(|_| index > 0)
                .map(|_| (index, self.watch_wait));
            let request = self.client.get::<Vec<StateCheckJson>>(
                "health_state",
                &segments,
                &params,
                blocking,
            );
            self.failovers.borrow_and_update();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.failovers.changed() => {
                    index = 0;
                    lock(&self.shared.lists).lists[self.list] = None;
                    self.shared.pulse.lists[self.list].fail();
                    continue;
                }
                r = request => r,
            };
            let succeeded = result.is_ok();
            let pause = match result {
                Ok(r) => {
                    self.outage.ok();
                    failures = 0;
                    index = next_index(index, r.index);
                    // Decoding into maps, diffing and patching walk every listed check and
                    // every view: off the runtime's workers, so queries never queue behind it.
                    let shared = self.shared.clone();
                    let list = self.list;
                    let listed = r.value.unwrap_or_default();
                    let applied = tokio::task::spawn_blocking(move || {
                        let new = seen_checks(listed);
                        let changes = {
                            let mut lists = lock(&shared.lists);
                            let changes = lists.lists[list].as_ref().map(|old| diff(old, &new));
                            lists.lists[list] = Some(new);
                            changes
                        };
                        shared.apply(changes.as_ref())
                    })
                    .await
                    .unwrap_or_default();
                    self.shared.pulse.lists[self.list].beat(r.index, Instant::now());
                    if applied.patched + applied.refreshed > 0 {
                        tracing::debug!(
                            state = self.state,
                            patched = applied.patched,
                            refreshed = applied.refreshed,
                            "health changes applied"
                        );
                    }
                    FEED_INTERVAL.saturating_sub(started.elapsed())
                }
                Err(e) => {
                    index = 0;
                    // Failing or refused: the slot serves a watcher better meanwhile.
                    slot = None;
                    lock(&self.shared.lists).lists[self.list] = None;
                    self.shared.pulse.lists[self.list].fail();
                    failures = failures.saturating_add(1);
                    // A datacenter gone from the federation: its views fail alike, and stop.
                    let refused = matches!(
                        e,
                        ClientError::NotFound
                            | ClientError::NoSuchDatacenter
                            | ClientError::Status { status: 403, .. }
                    );
                    if refused {
                        if !refused_logged {
                            refused_logged = true;
                            tracing::warn!(
                                error = %e,
                                state = self.state,
                                datacenter = self.shared.scope.as_deref().unwrap_or("local"),
                                "the agent refuses /v1/health/state: views without a blocking \
                                 query follow health changes only on their TTL"
                            );
                        }
                        FEED_UNSUPPORTED_RETRY
                    } else {
                        // Outages are logged by the watchers and the probe, not here.
                        tracing::debug!(error = %e, state = self.state, "change feed request failed");
                        backoff(failures)
                    }
                }
            };
            let queue = succeeded && slot.is_none() && index > 0;
            if !pause.is_zero() || queue {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    queued = self.client.sleep_queued_for_slot(pause, queue) => {
                        slot = slot.or(queued);
                    }
                }
            }
        }
    }
}

/// The running feeds by datacenter, each with what its views follow (see `freshness`).
pub(super) type RunningFeeds = Arc<Mutex<HashMap<FeedScope, Arc<FeedPulse>>>>;

/// Stops a remote datacenter's feeds once no view they could patch is left (its watchers stop
/// after `consul.watch_idle` without questions), looking every `every`. The check and the
/// removal happen under the `running` lock, which a new view takes only after its watch is in
/// the table: a view is never left without the feeds of its datacenter.
pub(super) async fn stop_when_unused(
    shared: FeedShared,
    stop: CancellationToken,
    running: RunningFeeds,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut running = lock(&running);
        let local_dc = lock(&shared.local_dc).clone();
        let used = lock(&shared.watches)
            .keys()
            .any(|key| feed_scope(key, local_dc.as_deref()).as_ref() == Some(&shared.scope));
        if !used {
            running.remove(&shared.scope);
            stop.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::catalog::HealthEntry;
    use crate::consul::name::Tenancy;

    fn seen(list: &[(&str, &str, Option<&str>, u64)]) -> SeenChecks {
        seen_checks(
            list.iter()
                .map(|(node, id, service, modify_index)| StateCheckJson {
                    node: (*node).to_owned(),
                    check_id: (*id).to_owned(),
                    service_id: service.map(|s| format!("{}-1", s.to_ascii_lowercase())),
                    service_name: service.map(str::to_owned),
                    modify_index: *modify_index,
                })
                .collect(),
        )
    }

    #[test]
    fn each_view_belongs_to_the_feeds_of_its_datacenter() {
        let key = |dc: Option<&str>, kind| {
            ViewKey::new(
                "web".into(),
                dc.map(str::to_owned),
                kind,
                Tenancy::default(),
            )
        };
        let service = ServiceKind::Service;
        assert_eq!(feed_scope(&key(None, service), None), Some(None));
        assert_eq!(feed_scope(&key(None, service), Some("dc1")), Some(None));
        // The local datacenter by name, once known, is the local feeds' view.
        assert_eq!(
            feed_scope(&key(Some("DC1"), service), Some("dc1")),
            Some(None)
        );
        assert_eq!(
            feed_scope(&key(Some("dc1"), service), None),
            Some(Some("dc1".to_owned()))
        );
        assert_eq!(
            feed_scope(&key(Some("Dc2"), service), Some("dc1")),
            Some(Some("dc2".to_owned()))
        );
        // The state lists do not name what a `.connect` view is asked by.
        assert_eq!(feed_scope(&key(None, ServiceKind::Connect), None), None);
        assert_eq!(
            feed_scope(&key(Some("dc2"), ServiceKind::Ingress), None),
            None
        );
    }

    #[test]
    fn diff_names_entered_left_and_rewritten_checks() {
        let old = seen(&[
            ("N1", "service:a-1", Some("A"), 5),
            ("n2", "serfHealth", None, 3),
            ("n4", "service:c-1", Some("c"), 4),
        ]);
        let new = seen(&[
            ("n1", "service:a-1", Some("a"), 7),
            ("n3", "service:b-1", Some("b"), 8),
            ("n4", "service:c-1", Some("c"), 4),
        ]);
        let changes = diff(&old, &new);
        let services: Vec<(&str, Vec<(String, u64)>)> = {
            let mut v: Vec<_> = changes
                .services
                .iter()
                .map(|(s, c)| (s.as_str(), c.iter().cloned().collect()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            services,
            vec![
                ("a", vec![("n1".to_owned(), service_id_key("a-1"))]),
                ("b", vec![("n3".to_owned(), service_id_key("b-1"))]),
            ]
        );
        assert_eq!(changes.nodes, HashSet::from(["n2".to_owned()]));
        assert_eq!(diff(&new, &new), Changes::default());
    }

    #[test]
    fn a_patch_recomputes_each_instance_from_the_lists() {
        // Two instances of `a` on n1 and n2, and one of `b` on n1 (whose checks must not
        // count for `a`'s instance there).
        let entries: Vec<HealthEntry> = serde_json::from_str(
            r#"[
              {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "a-1", "Service": "a", "Port": 80},
               "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:a-1", "Status": "passing", "ServiceID": "a-1"}]},
              {"Node": {"Node": "n2", "Address": "10.0.0.2"}, "Service": {"ID": "a-2", "Service": "a", "Port": 80},
               "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:a-2", "Status": "passing", "ServiceID": "a-2"}]}
            ]"#,
        )
        .expect("entries");
        let view = ServiceView::from_entries(&entries, "dc1");
        let critical = seen(&[
            ("n2", "serfHealth", None, 9),
            ("n1", "service:b-1", Some("b"), 9),
        ]);
        let warning = seen(&[("n1", "service:a-1", Some("a"), 9)]);
        let new = patched(&view, [&critical, &warning]).expect("changed");
        let statuses: Vec<Status> = new.instances.iter().map(|i| i.status).collect();
        assert_eq!(statuses, vec![Status::Warning, Status::Critical]);
        assert!(patched(&new, [&critical, &warning]).is_none());
        let none = SeenChecks::new();
        let back = patched(&new, [&none, &none]).expect("changed");
        assert!(back.same_data(&view));

        // A check of an instance the view has (a second check registered since the fetch
        // included) patches exactly; one of an instance it lacks needs a fetch.
        let note = |node: &str, id: &str| {
            let mut changes = Changes::default();
            let listed = seen(&[(node, id, Some("a"), 1)]);
            for (n, checks) in &listed {
                for c in checks.values() {
                    changes.note(n, c);
                }
            }
            changes
        };
        let known = note("n1", "service:a-1-extra");
        assert!(matches!(affects(&known, "a", &view), Affected::Known));
        let mut unknown = known;
        unknown
            .services
            .entry("a".into())
            .or_default()
            .insert(("n3".into(), service_id_key("a-3")));
        assert!(matches!(affects(&unknown, "a", &view), Affected::Unknown));
        assert!(matches!(affects(&unknown, "b", &view), Affected::No));
        let mut node_change = Changes::default();
        node_change.nodes.insert("n2".into());
        assert!(matches!(affects(&node_change, "a", &view), Affected::Known));
        node_change.nodes = HashSet::from(["n9".to_owned()]);
        assert!(matches!(affects(&node_change, "a", &view), Affected::No));
    }

    #[test]
    fn a_round_is_a_change_applied_and_a_view_missing_one_falls_behind() {
        use crate::consul::freshness::{CatalogPulse, Sources, Vouching};
        use crate::consul::views::tests::test_metrics;
        use std::sync::atomic::AtomicUsize;
        let entries: Vec<HealthEntry> = serde_json::from_str(
            r#"[{"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "a-1", "Service": "a", "Port": 80},
                 "Checks": [{"CheckID": "service:a-1", "Status": "passing", "ServiceID": "a-1"}]}]"#,
        )
        .expect("entries");
        let metrics = test_metrics();
        let pulse = Arc::new(FeedPulse::default());
        let catalog = Arc::new(CatalogPulse::default());
        let now = Instant::now();
        for l in pulse
            .lists
            .iter()
            .chain([&catalog.services, &catalog.nodes])
        {
            l.beat(1, now);
        }
        let w = Arc::new(Watch::new());
        w.on_demand.store(true, Ordering::SeqCst);
        w.freshness.follow(Sources {
            feed: pulse.clone(),
            catalog,
        });
        let basis = w.freshness.basis();
        w.state
            .send_replace(ViewState::Ready(Arc::new(ServiceView::from_entries(
                &entries, "dc1",
            ))));
        w.freshness.settle(basis, 0);
        let key = ViewKey::new("a".into(), None, ServiceKind::Service, Tenancy::default());
        let shared = FeedShared {
            scope: None,
            local_dc: Arc::new(Mutex::new(None)),
            watches: Arc::new(Mutex::new(HashMap::from([(key, w.clone())]))),
            lists: Arc::new(Mutex::new(HealthLists::default())),
            metrics: metrics.clone(),
            series: Arc::new(ServiceSeries {
                metrics,
                created: AtomicUsize::new(0),
            }),
            only_passing: false,
            pulse,
        };
        let limits = Vouching {
            alive_within: Duration::from_secs(60),
            refetch_after: Duration::from_secs(60),
        };
        let current = || w.freshness.current(Instant::now(), limits);
        assert!(current(), "fetched between rounds");
        // The first lists: every status recomputed, the view caught up.
        lock(&shared.lists).lists = [Some(SeenChecks::new()), Some(SeenChecks::new())];
        shared.apply(None);
        assert!(current());
        // A poll that found the same list is no round: a fetch in flight meanwhile settles.
        let in_flight = w.freshness.basis();
        shared.apply(Some(&Changes::default()));
        w.freshness.settle(in_flight, 0);
        assert!(current());
        // A change the view can be patched with: applied, current.
        let critical = seen(&[("n1", "service:a-1", Some("a"), 9)]);
        let changes = diff(&SeenChecks::new(), &critical);
        lock(&shared.lists).lists[0] = Some(critical);
        assert_eq!(shared.apply(Some(&changes)).patched, 1);
        assert!(current());
        // A change of an instance the view lacks: fetched again, behind until then.
        let lacking = seen(&[("n9", "service:a-9", Some("a"), 10)]);
        let changes = diff(&SeenChecks::new(), &lacking);
        assert_eq!(shared.apply(Some(&changes)).refreshed, 1);
        assert!(!current());
    }
}
