//! The agent itself: a liveness probe of the current agent (failing over to the next one), and
//! the discovery of its datacenter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::ConsulClient;
use super::outage::OutageLog;
use super::retry::backoff;
use crate::lock::lock;

/// How often the current agent is probed.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Probes the current agent; when it fails, moves to the next one and tells the watchers.
pub(super) async fn probe_agents(
    client: Arc<ConsulClient>,
    outage: Arc<OutageLog>,
    failovers: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        match client.probe_current().await {
            Some(Err(e)) => {
                outage.failed(&e);
                if client.fail_over() {
                    failovers.send_modify(|g| *g += 1);
                }
            }
            Some(Ok(())) => outage.ok(),
            None => {}
        }
    }
}

/// Asks `/v1/agent/self` for the agent's datacenter until it answers (with backoff), so names
/// without a datacenter label and names that spell out the local one share one view.
pub(super) async fn discover_datacenter(
    client: Arc<ConsulClient>,
    slot: Arc<Mutex<Option<String>>>,
    shutdown: CancellationToken,
) {
    #[derive(serde::Deserialize)]
    struct AgentSelf {
        #[serde(rename = "Config")]
        config: AgentConfig,
    }
    #[derive(serde::Deserialize)]
    struct AgentConfig {
        #[serde(rename = "Datacenter")]
        datacenter: String,
    }
    let mut failures = 0;
    loop {
        let fetched = client
            .get::<AgentSelf>("agent_self", &["v1", "agent", "self"], &[], None)
            .await;
        if let Ok(r) = fetched {
            if let Some(agent) = r.value {
                let dc = agent.config.datacenter.to_ascii_lowercase();
                tracing::info!(datacenter = %dc, "Consul agent's datacenter");
                *lock(&slot) = Some(dc);
                return;
            }
        }
        failures += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff(failures)) => {}
        }
    }
}
