//! The status page (`/` of the HTTP endpoint): watched services with their health and view age,
//! the Consul agents with their connection budgets, the upstreams (with their last minute's
//! attempts, failures and latency), the cache, recent reloads.
//! Server-rendered HTML, no external assets, no JavaScript, refreshing itself.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use html_escape::encode_text as esc;
use prometheus::core::Collector;

use super::gather::{last_contact, AgentState, Current, KeptView};
use super::render::{explain_href, page};
use crate::consul::name::ServiceKind;
use crate::consul::peek::seconds;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::recent::RECENT_WINDOW;

/// Services listed on the page (sorted by name); the rest are counted.
pub(crate) const MAX_LISTED_VIEWS: usize = 500;

/// Reloads remembered for the page.
pub(crate) const RELOADS_KEPT: usize = 10;

/// Seconds between the page's own refreshes.
const REFRESH_SECS: u32 = 5;

/// A reload's time and outcome (the error message when it failed).
type Reloaded = (SystemTime, Result<(), String>);

/// Recent reloads (newest last) with their outcome, for the status page.
#[derive(Clone, Default)]
pub(crate) struct ReloadLog(Arc<Mutex<VecDeque<Reloaded>>>);

impl ReloadLog {
    pub(crate) fn record(&self, outcome: Result<(), String>) {
        let mut log = lock(&self.0);
        if log.len() == RELOADS_KEPT {
            log.pop_front();
        }
        log.push_back((SystemTime::now(), outcome));
    }

    fn recent(&self) -> Vec<Reloaded> {
        lock(&self.0).iter().rev().cloned().collect()
    }
}

/// The Consul name that asks for a kept view (what its explain link asks).
fn view_name(view: &KeptView, domain: &str) -> String {
    let kind = match view.key.kind {
        ServiceKind::Service => "service",
        ServiceKind::Connect => "connect",
        ServiceKind::Ingress => "ingress",
    };
    let mut name = format!("{}.{kind}", view.key.service);
    if let Some(dc) = &view.key.dc {
        let _ = write!(name, ".{dc}");
    }
    let _ = write!(name, ".{}", domain.trim_end_matches('.'));
    name
}

/// The whole page.
pub(crate) fn render(now: &Current, reloads: &ReloadLog) -> String {
    let mut b = String::from("<h1>consul-dns-forwarder</h1>\n");
    let consul = now
        .consul
        .as_ref()
        .and_then(|c| c.source().as_consul().map(|s| s.backend().clone()));
    match &consul {
        Some(backend) => {
            let (views, total) = backend.kept_views(MAX_LISTED_VIEWS);
            let domain = now
                .config
                .consul
                .domains
                .first()
                .map_or_else(|| "consul".to_owned(), ToString::to_string);
            services_html(&mut b, &views, total, &domain);
            agents_html(&mut b, &backend.agents(), &now.metrics);
        }
        None => b.push_str("<p>No Consul views kept (Consul off, or consul.mode = \"dns\").</p>\n"),
    }
    upstreams_html(&mut b, now);
    cache_html(&mut b, now);
    reloads_html(&mut b, &reloads.recent());
    page("consul-dns-forwarder status", Some(REFRESH_SECS), &b)
}

fn services_html(b: &mut String, views: &[KeptView], total: usize, domain: &str) {
    let _ = writeln!(
        b,
        "<h2>Services ({total} watched{})</h2>\n<table id=\"services\"><tr><th>service</th>\
         <th>datacenter</th><th>healthy</th><th>warning</th><th>critical</th><th>view age</th></tr>",
        if total > views.len() {
            format!(", the first {} listed", views.len())
        } else {
            String::new()
        }
    );
    for v in views {
        let name = view_name(v, domain);
        let [ok, warn, crit] = v.counts.map_or([None; 3], |c| c.map(Some));
        let cell = |n: Option<usize>| n.map_or("-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            b,
            "<tr class=\"service\"><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td>\
             <td class=\"warn\">{}</td><td class=\"crit\">{}</td><td>{}</td></tr>",
            explain_href(&name, "A", None),
            esc(&name),
            esc(v.key.dc.as_deref().unwrap_or("local")),
            cell(ok),
            cell(warn),
            cell(crit),
            seconds(v.age).map_or("-".to_owned(), |s| format!("{s} s"))
        );
    }
    b.push_str("</table>\n");
}

fn agents_html(b: &mut String, agents: &[AgentState], metrics: &Metrics) {
    if agents.is_empty() {
        return;
    }
    let _ = writeln!(
        b,
        "<h2>Consul agents</h2>\n<p>Consul last reached: {}</p>\n<table id=\"agents\">\
         <tr><th>agent</th><th>in use</th><th>connections in use / budget</th></tr>",
        last_contact(metrics).map_or("never".to_owned(), |d| format!("{} s ago", d.as_secs()))
    );
    for a in agents {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
            esc(&a.agent),
            if a.current { "current" } else { "" },
            a.in_use,
            a.budget
        );
    }
    b.push_str("</table>\n");
}

/// Per upstream (its label): queries timed since the start.
fn upstream_queries(metrics: &Metrics, upstream: &str) -> u64 {
    let has = |m: &prometheus::proto::Metric| {
        m.get_label()
            .iter()
            .any(|l| l.name() == "upstream" && l.value() == upstream)
    };
    metrics
        .upstream_duration
        .collect()
        .iter()
        .flat_map(|family| family.get_metric().iter().filter(|m| has(m)))
        .map(|m| m.get_histogram().get_sample_count())
        .sum()
}

fn upstreams_html(b: &mut String, now: &Current) {
    let _ = writeln!(
        b,
        "<h2>Upstreams</h2>\n<table id=\"upstreams\"><tr><th>zone</th><th>upstream</th>\
         <th>queries since start</th><th>attempts, last {window} s</th>\
         <th>failures, last {window} s</th><th>mean latency, last {window} s</th>\
         <th>max latency, last {window} s</th></tr>",
        window = RECENT_WINDOW.as_secs()
    );
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1000.0)
        })
    };
    for (zone, server, recent) in now.forwarder.router().recent() {
        let label = server.to_string();
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"attempts\">{}</td>\
             <td class=\"failures\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&zone),
            esc(&label),
            upstream_queries(&now.metrics, &label),
            recent.attempts,
            recent.failures,
            ms(recent.mean_latency),
            ms(recent.max_latency),
        );
    }
    b.push_str("</table>\n");
}

fn cache_html(b: &mut String, now: &Current) {
    let cache = now.forwarder.cache();
    let hits = now.metrics.cache_hits.get();
    let misses = now.metrics.cache_misses.get();
    let ratio = if hits + misses > 0 {
        format!("{:.1} %", hits as f64 * 100.0 / (hits + misses) as f64)
    } else {
        "-".to_owned()
    };
    let _ = writeln!(
        b,
        "<h2>Cache</h2>\n<table id=\"cache\"><tr><th>entries</th><th>bytes</th><th>hits</th>\
         <th>misses</th><th>hit ratio</th></tr><tr><td>{}</td><td>{}</td><td>{hits}</td>\
         <td>{misses}</td><td>{ratio}</td></tr></table>",
        cache.entry_count(),
        cache.weight()
    );
}

fn reloads_html(b: &mut String, reloads: &[Reloaded]) {
    b.push_str("<h2>Recent reloads</h2>\n");
    if reloads.is_empty() {
        b.push_str("<p>none since the start</p>\n");
        return;
    }
    b.push_str("<table id=\"reloads\"><tr><th>when</th><th>outcome</th></tr>\n");
    for (at, outcome) in reloads {
        let ago = at.elapsed().unwrap_or(Duration::ZERO).as_secs();
        let _ = writeln!(
            b,
            "<tr><td>{} ({ago} s ago)</td><td>{}</td></tr>",
            humantime::format_rfc3339_seconds(*at),
            match outcome {
                Ok(()) => "reloaded".to_owned(),
                Err(e) => format!("failed: {}", esc(e)),
            }
        );
    }
    b.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::name::{Tenancy, ViewKey};

    #[test]
    fn service_rows_link_to_their_explain_page_escaped() {
        let view = KeptView {
            key: ViewKey::new(
                "web".into(),
                Some("dc2".into()),
                ServiceKind::Service,
                Tenancy::default(),
            ),
            counts: Some([2, 1, 1]),
            age: Some(Duration::from_secs(3)),
        };
        let mut b = String::new();
        services_html(&mut b, &[view], 1, "consul.");
        assert!(
            b.contains("href=\"/explain?format=html&amp;name=web.service.dc2.consul&amp;type=A\""),
            "{b}"
        );
        assert!(b.contains("<td>2</td>"));
    }

    #[test]
    fn the_reload_log_keeps_the_last_few() {
        let log = ReloadLog::default();
        for i in 0..(RELOADS_KEPT + 3) {
            log.record(Err(format!("r{i}")));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), RELOADS_KEPT);
        assert_eq!(recent[0].1, Err(format!("r{}", RELOADS_KEPT + 2)));
    }
}
