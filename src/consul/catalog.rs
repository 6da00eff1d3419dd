//! Consul's JSON (as `/v1/health/service`, `/v1/catalog/node` and `/v1/query/../execute` return
//! it) and the views built from it: each instance reduced to what DNS needs, with its worst
//! check status. Parsing is lenient about what DNS does not use and strict about what it does.
//!
//! Memory: a view is kept for every watched service (the target: 10,000 services of 10
//! instances in 64 MiB for the whole process), so an instance keeps only what answers use, strings that
//! repeat across the instances of a view (tags, hostnames) are shared, and a selection shares
//! its index lists when they are equal (`benches/view_memory.rs` measures it).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};

use super::addrs::{candidates, Addrs, AnyAddr, ServiceAddressJson, TaggedJson, WanTranslation};
use crate::lock::lock;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    pub(crate) node: NodeJson,
    pub(crate) service: ServiceJson,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) checks: Vec<CheckJson>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NodeJson {
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) meta: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) tagged_addresses: TaggedJson<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceJson {
    #[serde(rename = "ID", default)]
    pub(crate) id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) port: u16,
    #[serde(default)]
    pub(crate) weights: Option<WeightsJson>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) tagged_addresses: TaggedJson<ServiceAddressJson>,
    /// `connect-proxy` for a sidecar, `ingress-gateway` for a gateway, "" for a plain service:
    /// the catalog file's `.connect` views are made from these.
    #[serde(default)]
    pub(crate) kind: String,
    pub(crate) proxy: Option<ProxyJson>,
    pub(crate) connect: Option<ConnectJson>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ProxyJson {
    #[serde(default)]
    pub(crate) destination_service_name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ConnectJson {
    #[serde(default)]
    pub(crate) native: bool,
}

impl ServiceJson {
    /// The service this instance serves Connect traffic for, if any: a sidecar proxy's
    /// destination, or the service itself when it is Connect-native (what
    /// `/v1/health/connect/<service>` returns).
    pub(crate) fn connect_destination<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.kind == "connect-proxy" {
            self.proxy
                .as_ref()
                .map(|p| p.destination_service_name.as_str())
                .filter(|d| !d.is_empty())
        } else if self.connect.as_ref().is_some_and(|c| c.native) {
            Some(name)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct WeightsJson {
    #[serde(default = "one")]
    pub(crate) passing: u32,
    #[serde(default = "one")]
    pub(crate) warning: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CheckJson {
    #[serde(default)]
    pub(crate) status: String,
}

/// `/v1/catalog/node/<node>`: `null` for an unknown node.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CatalogNodeJson {
    pub(crate) node: NodeJson,
}

/// `/v1/query/<name>/execute`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct QueryExecuteJson {
    #[serde(default, deserialize_with = "null_as_default")]
    pub(crate) nodes: Vec<HealthEntry>,
    #[serde(rename = "DNS", default)]
    pub(crate) dns: Option<QueryDnsJson>,
    #[serde(default)]
    pub(crate) datacenter: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct QueryDnsJson {
    #[serde(rename = "TTL", default)]
    pub(crate) ttl: String,
}

/// Consul writes `null` for empty lists and maps in places; treat it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An instance's health: the worst of its checks (service and node checks alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    /// Anything but `passing` and `warning` (`critical`, `maintenance`, unknown) counts as
    /// critical: an instance we cannot vouch for gets no traffic.
    pub(crate) fn parse(s: &str) -> Status {
        match s {
            "passing" => Status::Passing,
            "warning" => Status::Warning,
            _ => Status::Critical,
        }
    }
}

/// The worst status among `checks`; passing when there are none (as Consul).
pub(crate) fn worst_status(checks: &[CheckJson]) -> Status {
    checks
        .iter()
        .map(|c| Status::parse(&c.status))
        .max()
        .unwrap_or(Status::Passing)
}

/// Lowercased strings and tag lists shared within one view: every instance of a service
/// usually carries the same tags, so each distinct tag, and each distinct list of them, is
/// stored once per view instead of once per instance.
#[derive(Default)]
struct Interner {
    strings: HashMap<Box<str>, Arc<str>>,
    tag_lists: HashMap<Vec<String>, Tags>,
    metas: HashMap<BTreeMap<String, String>, NodeMeta>,
}

/// An instance's tags, lowercased; instances with the same tags share one list.
pub(crate) type Tags = Arc<[Arc<str>]>;

/// The tag list of every untagged instance (an empty `Arc<[_]>` still allocates).
static NO_TAGS: LazyLock<Tags> = LazyLock::new(|| Arc::from(Vec::new()));

/// An instance's node meta (its TXT records in SRV answers), as (key, value) sorted by key.
/// The nodes of a real cluster mostly carry the same meta (`consul-network-segment`,
/// `consul-version`), so instances share one list per distinct content within a view: 8 bytes
/// an instance. A list, not a `BTreeMap`: a map's first node has room for 11 entries (540
/// bytes) however few it holds, and at 10,000 services of one-entry meta that was 5 MB.
pub type NodeMeta = Arc<[(Box<str>, Box<str>)]>;

/// The meta of every node without any (an empty `Arc<[_]>` still allocates).
static NO_META: LazyLock<NodeMeta> = LazyLock::new(|| Arc::from(Vec::new()));

impl Interner {
    fn lowercase(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let lower: Arc<str> = Arc::from(s.to_ascii_lowercase());
        // Keyed by the string as Consul wrote it: the common case (already lowercase, the same
        // spelling everywhere) costs one lookup.
        self.strings.insert(Box::from(s), lower.clone());
        lower
    }

    fn tags(&mut self, raw: &[String]) -> Tags {
        if raw.is_empty() {
            return NO_TAGS.clone();
        }
        if let Some(shared) = self.tag_lists.get(raw) {
            return shared.clone();
        }
        let tags: Tags = raw.iter().map(|t| self.lowercase(t)).collect();
        self.tag_lists.insert(raw.to_vec(), tags.clone());
        tags
    }

    fn meta(&mut self, meta: &BTreeMap<String, String>) -> NodeMeta {
        if meta.is_empty() {
            return NO_META.clone();
        }
        if let Some(shared) = self.metas.get(meta) {
            return shared.clone();
        }
        let shared: NodeMeta = meta
            .iter()
            .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
            .collect();
        self.metas.insert(meta.clone(), shared.clone());
        shared
    }
}

/// What identifies an instance's checks in `/v1/health/state` (`Node`, `ServiceID`) kept as a
/// hash: the change feed needs only to match a listed check to the instance on its node, and
/// a string per instance costs megabytes at 10,000 services (ARCHITECTURE.md). Two service IDs on one node would have to collide in 64 bits to be confused,
/// and then one instance's health would be wrong until its next fetch.
pub fn service_id_key(service_id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    // SipHash with fixed keys: the same value in every place that computes it.
    BuildHasherDefault::<DefaultHasher>::default().hash_one(service_id)
}

/// One service instance, as DNS sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub node: Box<str>,
    /// [`service_id_key`] of `Service.ID`.
    pub service_id: u64,
    /// What each kind of question gets: `Service.Address` or `Node.Address`, or one of their
    /// tagged addresses (dual stack, WAN).
    pub addrs: Addrs,
    /// `Service.Port`, or the `wan` tagged address's port with WAN translation.
    pub port: u16,
    /// Lowercased: DNS tag lookups are case-insensitive.
    pub tags: Tags,
    pub status: Status,
    /// The SRV weights (`Service.Weights`), capped to what an SRV record can carry.
    pub weight_passing: u16,
    pub weight_warning: u16,
    /// The node's meta, for TXT records beside SRV answers (`enable_additional_node_meta_txt`).
    pub node_meta: NodeMeta,
    // Not kept: the tagged addresses (resolved into `addrs`) and the node's own address when the
    // service has one (no answer uses it).
}

impl Instance {
    #[cfg(test)]
    pub(crate) fn from_entry(e: &HealthEntry) -> Instance {
        Instance::from_entry_in(e, &mut Interner::default(), WanTranslation::default(), "")
    }

    /// `dc`: the view's datacenter (WAN translation of the service address; the node's own
    /// `Datacenter` decides for the node address, as in Consul).
    fn from_entry_in(
        e: &HealthEntry,
        strings: &mut Interner,
        wan: WanTranslation<'_>,
        dc: &str,
    ) -> Instance {
        let service_wan = wan.applies(dc);
        let node_dc = if e.node.datacenter.is_empty() {
            dc
        } else {
            &e.node.datacenter
        };
        let addrs = Addrs::resolve(
            candidates(&e.service.address, &e.service.tagged_addresses, service_wan),
            candidates(
                &e.node.address,
                &e.node.tagged_addresses,
                wan.applies(node_dc),
            ),
            &e.node.address,
            &mut |h| strings.lowercase(h),
        )
        .with_own(&e.service.address);
        // Consul's `TranslateServicePort`: the `wan` tag's port, when it has one.
        let port = match &e.service.tagged_addresses.wan {
            Some(w) if service_wan && w.port != 0 => w.port,
            _ => e.service.port,
        };
        let weights = e.service.weights.unwrap_or(WeightsJson {
            passing: 1,
            warning: 1,
        });
        let srv_weight = |w: u32| u16::try_from(w).unwrap_or(u16::MAX);
        Instance {
            node: e.node.node.to_ascii_lowercase().into_boxed_str(),
            service_id: service_id_key(&e.service.id),
            addrs,
            port,
            tags: strings.tags(&e.service.tags),
            status: worst_status(&e.checks),
            weight_passing: srv_weight(weights.passing),
            weight_warning: srv_weight(weights.warning),
            node_meta: strings.meta(&e.node.meta),
        }
    }

    /// The SRV weight, as Consul's `findWeight`: 0 for a critical instance, which only a
    /// prepared query ignoring that check, or `when_none_healthy = "all"`, serves.
    pub(crate) fn weight(&self) -> u16 {
        match self.status {
            Status::Passing => self.weight_passing,
            Status::Warning => self.weight_warning,
            Status::Critical => 0,
        }
    }

    pub(crate) fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| &**t == tag)
    }
}

/// Everything known about one service in one datacenter, replaced whole on every change.
#[derive(Debug)]
pub struct ServiceView {
    pub(crate) instances: Vec<Instance>,
    pub(crate) datacenter: String,
    /// The `consul-virtual` tagged address of the first instance that has one (Connect
    /// instances of a service share it): `<service>.virtual`.
    pub(crate) virtual_ip: Option<IpAddr>,
    /// Selections already computed for this view (per tag and health rule), so a query costs the
    /// same whatever the number of instances.
    selections: Mutex<Selections>,
}

/// A view's selections. Nearly every view is asked one way only (no tag, the configured health
/// rule), so the first selection has a slot of its own and the map, which allocates room for
/// several entries at its first insert, exists only for views asked more ways.
#[derive(Debug, Default)]
struct Selections {
    first: Option<(SelectionKey, Arc<Selection>)>,
    more: HashMap<SelectionKey, Arc<Selection>>,
}

impl Selections {
    fn get(&self, key: &SelectionKey) -> Option<&Arc<Selection>> {
        match &self.first {
            Some((k, s)) if k == key => Some(s),
            _ => self.more.get(key),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn insert(&mut self, key: SelectionKey, selection: Arc<Selection>) {
        if self.first.is_none() {
            self.first = Some((key, selection));
        } else {
            self.more.insert(key, selection);
        }
    }
}

/// What decides which instances a lookup serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SelectionKey {
    pub(crate) tag: Option<String>,
    pub(crate) only_passing: bool,
    pub(crate) all_when_none_healthy: bool,
    /// Every instance whatever its health: a prepared query's result, which Consul filtered
    /// by the query's own rules (`OnlyPassing`, `IgnoreCheckIDs`).
    pub(crate) unfiltered: bool,
}

/// The instances one kind of lookup serves, as indices into `ServiceView::instances`, split
/// by what each kind of question gets (their [`Addrs`]) so a query samples only what it can
/// answer with. Lists with the same content share one allocation (in the usual view, every
/// instance has an IPv4 address, and `all`, `v4` and `with_ip` are one list).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub all: Arc<[u32]>,
    /// Instances with an A answer.
    pub v4: Arc<[u32]>,
    /// Instances with an AAAA answer.
    pub(crate) v6: Arc<[u32]>,
    /// Instances whose ANY answer is an address.
    pub(crate) with_ip: Arc<[u32]>,
    /// Instances with a hostname: the CNAME answers of questions no instance has an address for.
    pub(crate) hosts: Arc<[u32]>,
}

/// The empty index list every selection shares (an empty `Arc<[u32]>` still allocates).
static EMPTY_LIST: LazyLock<Arc<[u32]>> = LazyLock::new(|| Arc::from(Vec::new()));

/// Distinct tags remembered per view; a flood of made-up tags cannot grow it without bound.
const MAX_SELECTIONS_PER_VIEW: usize = 256;

impl ServiceView {
    pub fn new(mut instances: Vec<Instance>, datacenter: &str) -> ServiceView {
        instances.shrink_to_fit();
        ServiceView {
            instances,
            datacenter: datacenter.to_owned(),
            virtual_ip: None,
            selections: Mutex::new(Selections::default()),
        }
    }

    pub fn from_entries(entries: &[HealthEntry], datacenter: &str) -> ServiceView {
        ServiceView::from_entries_translated(entries, datacenter, WanTranslation::default())
    }

    /// A view of `datacenter`, its addresses translated as Consul's `translate_wan_addrs` does.
    pub fn from_entries_translated(
        entries: &[HealthEntry],
        datacenter: &str,
        wan: WanTranslation<'_>,
    ) -> ServiceView {
        let mut strings = Interner::default();
        let mut view = ServiceView::new(
            entries
                .iter()
                .map(|e| Instance::from_entry_in(e, &mut strings, wan, datacenter))
                .collect(),
            datacenter,
        );
        view.virtual_ip = entries.iter().find_map(|e| {
            let tagged = e.service.tagged_addresses.consul_virtual.as_ref()?;
            tagged.address.parse().ok()
        });
        view
    }

    /// The same data as another view? (A blocking query can return without a change.)
    pub(crate) fn same_data(&self, other: &ServiceView) -> bool {
        self.instances == other.instances && self.virtual_ip == other.virtual_ip
    }

    pub(crate) fn healthy_count(&self, only_passing: bool) -> usize {
        self.instances
            .iter()
            .filter(|i| is_healthy(i.status, only_passing))
            .count()
    }

    /// The instances served for `key`: tag-filtered, then healthy only, or every tagged one
    /// when none is healthy and `all_when_none_healthy`. Computed once per view and key.
    pub(crate) fn selection(&self, key: &SelectionKey) -> Arc<Selection> {
        let mut cache = lock(&self.selections);
        if let Some(s) = cache.get(key) {
            return s.clone();
        }
        let computed = Arc::new(self.compute_selection(key));
        if cache.len() < MAX_SELECTIONS_PER_VIEW {
            cache.insert(key.clone(), computed.clone());
        }
        computed
    }

    fn compute_selection(&self, key: &SelectionKey) -> Selection {
        let tagged: Vec<u32> = self
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| key.tag.as_deref().is_none_or(|t| i.has_tag(t)))
            .map(|(n, _)| u32::try_from(n).unwrap_or(u32::MAX))
            .collect();
        let healthy: Vec<u32> = tagged
            .iter()
            .copied()
            .filter(|&n| {
                key.unfiltered || is_healthy(self.instances[n as usize].status, key.only_passing)
            })
            .collect();
        let all = if healthy.is_empty() && key.all_when_none_healthy {
            tagged
        } else {
            healthy
        };
        let addrs_of = |n: &u32| &self.instances[*n as usize].addrs;
        let all: Arc<[u32]> = if all.is_empty() {
            EMPTY_LIST.clone()
        } else {
            Arc::from(all)
        };
        let subset = |keep: &dyn Fn(&u32) -> bool| -> Arc<[u32]> {
            let list: Vec<u32> = all.iter().copied().filter(|n| keep(n)).collect();
            if list.len() == all.len() {
                all.clone()
            } else if list.is_empty() {
                EMPTY_LIST.clone()
            } else {
                Arc::from(list)
            }
        };
        let v4 = subset(&|n| addrs_of(n).v4.is_some());
        let v6 = subset(&|n| addrs_of(n).v6.is_some());
        let with_ip = subset(&|n| matches!(addrs_of(n).any, AnyAddr::V4 | AnyAddr::V6));
        let hosts = subset(&|n| addrs_of(n).host.is_some());
        Selection {
            all,
            v4,
            v6,
            with_ip,
            hosts,
        }
    }
}

/// Consul's DNS rule: critical is never served; warning only when `only_passing` is off.
pub(crate) fn is_healthy(status: Status, only_passing: bool) -> bool {
    match status {
        Status::Passing => true,
        Status::Warning => !only_passing,
        Status::Critical => false,
    }
}

/// A catalog node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub(crate) name: String,
    /// What each kind of question gets: `Address` or a tagged address (Consul's
    /// `makeRecordFromNode`).
    pub(crate) addrs: Addrs,
    pub(crate) meta: BTreeMap<String, String>,
}

impl NodeView {
    /// `dc`: the datacenter asked, for a node whose JSON names none.
    pub(crate) fn from_json(n: &NodeJson, wan: WanTranslation<'_>, dc: &str) -> NodeView {
        let node_dc = if n.datacenter.is_empty() {
            dc
        } else {
            &n.datacenter
        };
        NodeView {
            name: n.node.to_ascii_lowercase(),
            addrs: Addrs::resolve(
                ["", "", ""],
                candidates(&n.address, &n.tagged_addresses, wan.applies(node_dc)),
                &n.address,
                &mut |h| Arc::from(h.to_ascii_lowercase()),
            ),
            meta: n.meta.clone(),
        }
    }
}

/// A prepared query's result.
#[derive(Clone, Debug)]
pub struct QueryView {
    pub(crate) service: Arc<ServiceView>,
    /// `DNS.TTL` of the query, when set.
    pub(crate) ttl: Option<std::time::Duration>,
    /// Consul sorted the result (the query's `Near`): answers keep its order. Otherwise Consul
    /// shuffled it, and so does every answer made from it.
    pub(crate) keeps_order: bool,
}

/// The catalog file: `{"<service>": [entries as /v1/health/service returns them]}`.
pub(crate) type CatalogFile = BTreeMap<String, Vec<HealthEntry>>;

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/support/consul_samples/health-service.json");

    #[test]
    fn parses_consul_sample() {
        let entries: Vec<HealthEntry> = serde_json::from_str(SAMPLE).expect("sample parses");
        let i = Instance::from_entry(&entries[0]);
        assert_eq!(&*i.node, "foobar");
        let own = Addrs::ip("10.1.10.12".parse().expect("ip"), false).with_own("10.1.10.12");
        assert_eq!(i.addrs, own);
        assert_eq!(i.addrs.own_ip(), Some("10.1.10.12".parse().expect("ip")));
        assert_eq!(i.port, 8000);
        assert_eq!(&*i.tags, &[Arc::<str>::from("primary")]);
        assert_eq!(i.status, Status::Passing);
        assert_eq!(i.weight(), 10);
    }

    #[test]
    fn node_checks_count_and_unknown_is_critical() {
        let mut entries: Vec<HealthEntry> = serde_json::from_str(SAMPLE).expect("sample");
        entries[0].checks[1].status = "critical".into(); // serfHealth
        assert_eq!(Instance::from_entry(&entries[0]).status, Status::Critical);
        entries[0].checks[1].status = "maintenance".into();
        assert_eq!(Instance::from_entry(&entries[0]).status, Status::Critical);
        entries[0].checks[1].status = "warning".into();
        let i = Instance::from_entry(&entries[0]);
        assert_eq!(i.status, Status::Warning);
        assert_eq!(i.weight(), 1);
        assert!(is_healthy(i.status, false));
        assert!(!is_healthy(i.status, true));
    }

    #[test]
    fn nulls_and_missing_fields() {
        let e: HealthEntry = serde_json::from_str(
            r#"{"Node":{"Node":"n","Address":"10.0.0.1","Meta":null},
                "Service":{"Service":"s","Tags":null,"Address":"","Port":80},"Checks":null}"#,
        )
        .expect("parses");
        let i = Instance::from_entry(&e);
        assert_eq!(i.addrs, Addrs::ip("10.0.0.1".parse().expect("ip"), true));
        assert_eq!(i.weight(), 1);
        let e: HealthEntry = serde_json::from_str(
            r#"{"Node":{"Node":"n","Address":"10.0.0.1","TaggedAddresses":null},
                "Service":{"Service":"s","Port":80,"TaggedAddresses":null}}"#,
        )
        .expect("parses");
        assert_eq!(
            Instance::from_entry(&e).addrs,
            Addrs::ip("10.0.0.1".parse().expect("ip"), true)
        );
    }

    #[test]
    fn wan_translation_of_the_sample() {
        // The sample's service has a `wan` tagged address (198.18.1.2:80) in dc1.
        let entries: Vec<HealthEntry> = serde_json::from_str(SAMPLE).expect("sample parses");
        let from = |local: &str| {
            let wan = WanTranslation {
                enabled: true,
                local_dc: Some(local),
            };
            let v = ServiceView::from_entries_translated(&entries, "dc1", wan);
            (v.instances[0].addrs.clone(), v.instances[0].port)
        };
        let lan = (
            Addrs::ip("10.1.10.12".parse().expect("ip"), false).with_own("10.1.10.12"),
            8000,
        );
        assert_eq!(from("dc1"), lan);
        assert_eq!(
            from("dc2"),
            (Addrs::ip("198.18.1.2".parse().expect("ip"), false), 80)
        );
        assert_eq!(
            ServiceView::from_entries(&entries, "dc1").instances[0].addrs,
            lan.0
        );
    }

    #[test]
    fn hostname_address() {
        let e: HealthEntry = serde_json::from_str(
            r#"{"Node":{"Node":"n","Address":"10.0.0.1"},
                "Service":{"Service":"s","Address":"DB.Example.COM.","Port":80}}"#,
        )
        .expect("parses");
        let addrs = Instance::from_entry(&e).addrs;
        assert_eq!(addrs.host.as_deref(), Some("db.example.com"));
        assert_eq!(addrs.any, AnyAddr::Host);
    }
}
