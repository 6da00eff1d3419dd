//! What `explain` and the status page read of the HTTP backend: the kept views, the check
//! details of one kept view, the agents' connection budgets. Reads only: no watch is started
//! and no name is looked up that a DNS query has not made known.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::catalog::{ServiceView, Status};
use super::http::HttpBackend;
use super::name::ViewKey;
use super::views::ViewState;
use crate::explain::details::DetailEntry;
use crate::explain::gather::{AgentState, KeptView, ViewPeek};
use crate::lock::lock;

/// Healthy, warning and critical instances of a view.
pub(crate) fn health_counts(view: &ServiceView) -> [usize; 3] {
    let mut counts = [0; 3];
    for i in &view.instances {
        counts[match i.status {
            Status::Passing => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        }] += 1;
    }
    counts
}

impl HttpBackend {
    pub(super) fn peek(&self, key: &ViewKey) -> Result<ViewPeek, String> {
        let Some(w) = lock(&self.watches).get(key).cloned() else {
            return Err(
                "no view kept: no DNS query asked for this name lately, or Consul does \
                        not have it (a DNS query for it makes the view)"
                    .to_owned(),
            );
        };
        let state = w.state.borrow().clone();
        match state {
            ViewState::Ready(view) => {
                let index = w.index.load(Ordering::Relaxed);
                let patched = lock(&w.fetched_view)
                    .upgrade()
                    .is_none_or(|fetched| !Arc::ptr_eq(&fetched, &view));
                let mut kept_fresh_by = if w.on_demand.load(Ordering::SeqCst) {
                    "on demand (no blocking query slot; refreshed when older than its TTL \
                     or when the change feed sees a health change)"
                } else {
                    "blocking query"
                }
                .to_owned();
                if patched {
                    kept_fresh_by.push_str("; patched by the change feed since its last fetch");
                }
                Ok(ViewPeek {
                    view,
                    confirmed_ago: w.last_confirmed.load().map(|at| at.elapsed()),
                    index: (index > 0).then_some(index),
                    agent: Some(self.client.current_agent()),
                    kept_fresh_by,
                    patched_by_feed: patched,
                })
            }
            ViewState::Pending => Err("the first fetch is in progress".to_owned()),
            ViewState::NoDatacenter => Err("Consul has no such datacenter".to_owned()),
            ViewState::Failed(e) => Err(format!("Consul unavailable: {e}")),
        }
    }

    pub(super) async fn details(&self, key: &ViewKey) -> Result<Vec<DetailEntry>, String> {
        if !lock(&self.watches).contains_key(key) {
            return Err("not read: the view is not kept".to_owned());
        }
        let (endpoint, segments) = key.endpoint();
        let got = self
            .client
            .get::<Vec<DetailEntry>>(endpoint, &segments, &key.params(), None)
            .await
            .map_err(|e| format!("not read: {e}"))?;
        Ok(got.value.unwrap_or_default())
    }

    pub(super) fn kept(&self, max: usize) -> (Vec<KeptView>, usize) {
        let (mut watches, total) = {
            let map = lock(&self.watches);
            let all: Vec<_> = map.iter().map(|(k, w)| (k.clone(), w.clone())).collect();
            (all, map.len())
        };
        watches.sort_by(|a, b| a.0.service.cmp(&b.0.service));
        watches.truncate(max);
        let views = watches
            .into_iter()
            .map(|(key, w)| {
                let state = w.state.borrow().clone();
                let counts = match &state {
                    ViewState::Ready(v) => Some(health_counts(v)),
                    _ => None,
                };
                KeptView {
                    key,
                    counts,
                    age: w.last_confirmed.load().map(|at| at.elapsed()),
                }
            })
            .collect();
        (views, total)
    }

    pub(super) fn agent_states(&self) -> Vec<AgentState> {
        let current = self.client.current_agent();
        self.client
            .budgets_in_use()
            .into_iter()
            .map(|(agent, in_use, budget)| AgentState {
                current: agent == current,
                agent,
                in_use,
                budget,
            })
            .collect()
    }
}

/// Age of a view confirmed `ago`, for display.
pub(crate) fn seconds(ago: Option<Duration>) -> Option<f64> {
    ago.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0)
}
