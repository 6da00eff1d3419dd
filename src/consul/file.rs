//! The catalog-file backend: services read from a JSON file shaped like Consul's health API
//! (`{"<service>": [entries as /v1/health/service returns them]}`), answered with no Consul at
//! all. Used by `--dev` (the demo catalog) and for hosts that get their catalog pushed as a file.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;

use super::addrs::WanTranslation;
use super::catalog::{CatalogFile, HealthEntry, NodeView, QueryView, ServiceView};
use super::name::{ServiceKind, Tenancy, ViewKey};
use super::ptr::{AddressIndex, PtrName};
use super::{Backend, LookupError, StillServed};
use crate::explain::details::DetailEntry;
use crate::explain::gather::{KeptView, ViewPeek};

/// The demo catalog served by `--dev` when no catalog file is given.
pub const DEMO_CATALOG: &str = include_str!("../../conf/demo-catalog.json");

/// Datacenter assumed when neither the config nor the file names one.
pub(crate) const DEFAULT_DATACENTER: &str = "dc1";

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog file {path}: line {line}, column {column}: {message} (expected {{\"<service>\": [entries as /v1/health/service/<service> returns them]}})")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

struct Catalog {
    services: HashMap<String, Arc<ServiceView>>,
    /// `.connect` views: the sidecar proxies (`Kind: "connect-proxy"`, by their
    /// `Proxy.DestinationServiceName`) and Connect-native instances found in the file, as
    /// `/v1/health/connect/<service>` would list them.
    connect: HashMap<String, Arc<ServiceView>>,
    nodes: HashMap<String, Arc<NodeView>>,
    datacenter: String,
    /// PTR answers: the nodes' addresses, then the instances' own addresses.
    node_addresses: AddressIndex,
    service_addresses: AddressIndex,
    /// The file as read: `explain` reads each instance's checks from it (the views keep only
    /// the worst status).
    text: Arc<str>,
}

pub struct FileBackend {
    catalog: RwLock<Arc<Catalog>>,
}

fn parse(text: &str, path: &str, configured_dc: Option<&str>) -> Result<Catalog, CatalogError> {
    let file: CatalogFile = serde_json::from_str(text).map_err(|e| CatalogError::Parse {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let datacenter = configured_dc
        .map(str::to_owned)
        .or_else(|| {
            file.values()
                .flatten()
                .map(|e| e.node.datacenter.to_ascii_lowercase())
                .find(|d| !d.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_DATACENTER.to_owned());
    let mut nodes = HashMap::new();
    let mut services = HashMap::new();
    let mut connect: HashMap<String, Vec<HealthEntry>> = HashMap::new();
    for (name, entries) in &file {
        for e in entries {
            nodes
                .entry(e.node.node.to_ascii_lowercase())
                .or_insert_with(|| {
                    // One datacenter: nothing is another's, so no WAN translation.
                    let wan = WanTranslation::default();
                    Arc::new(NodeView::from_json(&e.node, wan, &datacenter))
                });
            if let Some(destination) = e.service.connect_destination(name) {
                connect
                    .entry(destination.to_ascii_lowercase())
                    .or_default()
                    .push(e.clone());
            }
        }
        services.insert(
            name.to_ascii_lowercase(),
            Arc::new(ServiceView::from_entries(entries, &datacenter)),
        );
    }
    let connect = connect
        .into_iter()
        .map(|(name, entries)| {
            (
                name,
                Arc::new(ServiceView::from_entries(&entries, &datacenter)),
            )
        })
        .collect();
    let (node_addresses, service_addresses) = address_indexes(&file);
    Ok(Catalog {
        services,
        connect,
        nodes,
        datacenter,
        node_addresses,
        service_addresses,
        text: Arc::from(text),
    })
}

/// The file's node addresses and instances' own addresses, for PTR answers. A file beyond
/// [`super::ptr::MAX_PTR_ADDRESSES`] is cut, with a warning (there are no metrics here).
fn address_indexes(file: &CatalogFile) -> (AddressIndex, AddressIndex) {
    let ip = |s: &str| s.trim().parse::<IpAddr>().ok();
    let entries = || {
        file.iter()
            .flat_map(|(name, es)| es.iter().map(move |e| (name, e)))
    };
    let (nodes, dropped_nodes) = AddressIndex::build(entries().filter_map(|(_, e)| {
        Some((
            ip(&e.node.address)?,
            e.node.node.as_str(),
            e.node.node.as_str(),
        ))
    }));
    let (services, dropped_services) = AddressIndex::build(entries().filter_map(|(name, e)| {
        Some((ip(&e.service.address)?, e.node.node.as_str(), name.as_str()))
    }));
    if dropped_nodes + dropped_services > 0 {
        tracing::warn!(
            left_out = dropped_nodes + dropped_services,
            "the catalog file has more addresses than PTR answers keep: the highest are forwarded"
        );
    }
    (nodes, services)
}

impl FileBackend {
    pub fn from_text(
        text: &str,
        path: &str,
        dc: Option<&str>,
    ) -> Result<FileBackend, CatalogError> {
        Ok(FileBackend {
            catalog: RwLock::new(Arc::new(parse(text, path, dc)?)),
        })
    }

    pub(crate) fn load(path: &Path, dc: Option<&str>) -> Result<FileBackend, CatalogError> {
        let text = read(path)?;
        FileBackend::from_text(&text, &path.display().to_string(), dc)
    }

    fn current(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn check_dc(&self, catalog: &Catalog, dc: Option<&str>) -> Result<(), LookupError> {
        match dc {
            Some(dc) if dc != catalog.datacenter => Err(LookupError::NoSuchDatacenter),
            _ => Ok(()),
        }
    }
}

/// The [`StillServed`] check of a file's views: always.
struct Always;

impl StillServed for Always {
    fn still_served(&self, _now: Instant) -> bool {
        true
    }
}

/// A catalog file is one datacenter's catalog: no cluster peers, and the one (default)
/// namespace and partition of Consul CE. Names with those labels are NXDOMAIN, as Consul CE
/// answers them.
fn check_tenancy(tenancy: &Tenancy) -> Result<(), LookupError> {
    if tenancy.is_default() {
        Ok(())
    } else {
        Err(LookupError::NoSuchName)
    }
}

fn read(path: &Path) -> Result<String, CatalogError> {
    std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[async_trait]
impl Backend for FileBackend {
    fn peek_service(&self, key: &ViewKey) -> Result<ViewPeek, String> {
        let catalog = self.current();
        let views = match key.kind {
            ServiceKind::Service => &catalog.services,
            ServiceKind::Connect => &catalog.connect,
            ServiceKind::Ingress => return Err("a catalog file has no ingress gateways".into()),
        };
        let view = views
            .get(&key.service)
            .cloned()
            .ok_or_else(|| "the catalog file has no such service".to_owned())?;
        Ok(ViewPeek {
            view,
            confirmed_ago: None,
            index: None,
            agent: None,
            kept_fresh_by: "catalog file".to_owned(),
            patched_by_feed: false,
        })
    }

    async fn service_details(&self, key: &ViewKey) -> Result<Vec<DetailEntry>, String> {
        if key.kind != ServiceKind::Service {
            return Err("only .service names have checks in a catalog file".into());
        }
        let text = self.current().text.clone();
        let file: HashMap<String, Vec<DetailEntry>> =
            serde_json::from_str(&text).map_err(|e| e.to_string())?;
        Ok(file
            .into_iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&key.service))
            .map(|(_, entries)| entries)
            .unwrap_or_default())
    }

    fn kept_views(&self, max: usize) -> (Vec<KeptView>, usize) {
        let catalog = self.current();
        let mut names: Vec<&String> = catalog.services.keys().collect();
        names.sort();
        let views = names
            .iter()
            .take(max)
            .filter_map(|name| {
                let view = catalog.services.get(*name)?;
                Some(KeptView {
                    key: ViewKey::new(
                        (*name).clone(),
                        None,
                        ServiceKind::Service,
                        Tenancy::default(),
                    ),
                    counts: Some(super::peek::health_counts(view)),
                    age: None,
                })
            })
            .collect();
        (views, names.len())
    }

    async fn local_datacenter(&self) -> Option<String> {
        Some(self.current().datacenter.clone())
    }

    async fn service(&self, key: &ViewKey) -> Result<Arc<ServiceView>, LookupError> {
        let catalog = self.current();
        self.check_dc(&catalog, key.dc.as_deref())?;
        check_tenancy(&key.tenancy)?;
        // A file has no ingress-gateway config entries: no `.ingress` view has instances.
        let views = match key.kind {
            ServiceKind::Service => Some(&catalog.services),
            ServiceKind::Connect => Some(&catalog.connect),
            ServiceKind::Ingress => None,
        };
        Ok(views
            .and_then(|v| v.get(&key.service))
            .cloned()
            .unwrap_or_else(|| Arc::new(ServiceView::new(Vec::new(), &catalog.datacenter))))
    }

    /// A file's views never change: the catalog is read once, and a reload builds a new
    /// backend (and with it a new table of encoded answers).
    fn serving(&self, key: &ViewKey, view: &Arc<ServiceView>) -> Option<Box<dyn StillServed>> {
        let catalog = self.current();
        self.check_dc(&catalog, key.dc.as_deref()).ok()?;
        check_tenancy(&key.tenancy).ok()?;
        let current = match key.kind {
            ServiceKind::Service => catalog.services.get(&key.service),
            ServiceKind::Connect => catalog.connect.get(&key.service),
            ServiceKind::Ingress => None,
        };
        current
            .is_some_and(|c| Arc::ptr_eq(c, view))
            .then(|| Box::new(Always) as Box<dyn StillServed>)
    }

    async fn node(
        &self,
        node: &str,
        dc: Option<&str>,
        tenancy: &Tenancy,
    ) -> Result<Option<Arc<NodeView>>, LookupError> {
        let catalog = self.current();
        self.check_dc(&catalog, dc)?;
        check_tenancy(tenancy)?;
        Ok(catalog.nodes.get(node).cloned())
    }

    async fn query(
        &self,
        _name: &str,
        dc: Option<&str>,
    ) -> Result<Option<Arc<QueryView>>, LookupError> {
        let catalog = self.current();
        self.check_dc(&catalog, dc)?;
        // A catalog file has no prepared queries.
        Ok(None)
    }

    fn may_know_address(&self, ip: IpAddr) -> bool {
        let catalog = self.current();
        catalog.node_addresses.get(ip).is_some() || catalog.service_addresses.get(ip).is_some()
    }

    async fn address_name(&self, ip: IpAddr) -> Option<PtrName> {
        let catalog = self.current();
        if let Some(node) = catalog.node_addresses.get(ip) {
            return Some(PtrName::Node(node.to_owned()));
        }
        let service = catalog.service_addresses.get(ip)?;
        Some(PtrName::Service(service.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_catalog_parses() {
        let b = FileBackend::from_text(DEMO_CATALOG, "demo", None).expect("demo parses");
        let c = b.current();
        assert!(c.services.contains_key("web"));
        assert_eq!(c.datacenter, "dc1");
    }

    /// A file with `web` (one plain instance), its sidecar, a Connect-native `api` and an
    /// ingress gateway for `web`.
    const MESH: &str = r#"{
      "web": [{"Node": {"Node": "n1", "Address": "10.0.0.1"},
               "Service": {"ID": "web-1", "Service": "web", "Port": 8080}}],
      "web-sidecar-proxy": [{"Node": {"Node": "n1", "Address": "10.0.0.1"},
               "Service": {"ID": "web-1-sidecar", "Service": "web-sidecar-proxy", "Port": 21000,
                           "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "web"},
                           "TaggedAddresses": {"consul-virtual": {"Address": "240.0.0.1", "Port": 21000}}}}],
      "api": [{"Node": {"Node": "n2", "Address": "10.0.0.2"},
               "Service": {"ID": "api-1", "Service": "api", "Port": 9090, "Connect": {"Native": true}}}],
      "gw": [{"Node": {"Node": "n3", "Address": "10.0.0.3"},
               "Service": {"ID": "gw-1", "Service": "gw", "Port": 8443, "Kind": "ingress-gateway"}}]
    }"#;

    fn ports(view: &ServiceView) -> Vec<u16> {
        view.instances.iter().map(|i| i.port).collect()
    }

    #[tokio::test]
    async fn connect_views_come_from_sidecars_and_native_instances() {
        let b = FileBackend::from_text(MESH, "mesh.json", None).expect("parses");
        let key = |s: &str, kind| ViewKey::new(s.into(), None, kind, Tenancy::default());
        let web = b
            .service(&key("web", ServiceKind::Connect))
            .await
            .expect("web");
        assert_eq!(ports(&web), vec![21000]);
        assert_eq!(web.virtual_ip, Some("240.0.0.1".parse().expect("ip")));
        let api = b
            .service(&key("api", ServiceKind::Connect))
            .await
            .expect("api");
        assert_eq!(ports(&api), vec![9090]);
        assert_eq!(api.virtual_ip, None);
        let plain = b
            .service(&key("web", ServiceKind::Service))
            .await
            .expect("web");
        assert_eq!(ports(&plain), vec![8080]);
        // No gateway config entries in a file: `.ingress` has no instances.
        let ingress = b
            .service(&key("web", ServiceKind::Ingress))
            .await
            .expect("web");
        assert!(ingress.instances.is_empty());
        // No peers, namespaces or partitions in a file.
        let peer = Tenancy::new(Some("p1".into()), None, None);
        let peered = ViewKey::new("web".into(), None, ServiceKind::Service, peer.clone());
        assert!(matches!(
            b.service(&peered).await,
            Err(LookupError::NoSuchName)
        ));
        assert!(matches!(
            b.node("n1", None, &peer).await,
            Err(LookupError::NoSuchName)
        ));
    }

    #[test]
    fn bad_catalog_names_line_and_shape() {
        let err = FileBackend::from_text("{\"web\": [ {\"Node\": 5} ]}", "cat.json", None)
            .err()
            .expect("bad shape");
        let msg = err.to_string();
        assert!(msg.contains("cat.json: line 1"), "{msg}");
        assert!(msg.contains("expected {\"<service>\""), "{msg}");
    }
}
