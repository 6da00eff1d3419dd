//! Each instance's checks (name, status, first line of output), which the views do not keep
//! (a view keeps only the worst status: 10,000 services must fit in 64 MiB). Read from the same
//! JSON the views are built from (`/v1/health/service/<name>`, or the catalog file) with a
//! struct of its own, so the views' parsing stays as lean as it is.

use std::collections::HashMap;

use serde::Deserialize;

use super::CheckInfo;
use crate::consul::catalog::service_id_key;

/// Longest check output line kept (Consul keeps up to 4 KiB of output per check).
pub(crate) const MAX_OUTPUT_CHARS: usize = 200;

/// Longest check name kept.
const MAX_NAME_CHARS: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DetailEntry {
    node: DetailNode,
    service: DetailService,
    #[serde(default, deserialize_with = "null_as_empty")]
    checks: Vec<DetailCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DetailNode {
    #[serde(default)]
    node: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DetailService {
    #[serde(rename = "ID", default)]
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DetailCheck {
    #[serde(default)]
    name: String,
    #[serde(rename = "CheckID", default)]
    check_id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    output: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DetailCheck>, D::Error> {
    Ok(Option::<Vec<DetailCheck>>::deserialize(d)?.unwrap_or_default())
}

/// Checks by instance: node (lowercased) and the hash of the service ID, as `Instance` keys them.
pub(crate) type ChecksByInstance = HashMap<(String, u64), Vec<CheckInfo>>;

/// The checks of every entry, keyed as the view's instances are.
pub(crate) fn by_instance(entries: Vec<DetailEntry>) -> ChecksByInstance {
    entries
        .into_iter()
        .map(|e| {
            let checks = e
                .checks
                .into_iter()
                .map(|c| CheckInfo {
                    name: clean(
                        if c.name.is_empty() {
                            &c.check_id
                        } else {
                            &c.name
                        },
                        MAX_NAME_CHARS,
                    ),
                    status: clean(&c.status, MAX_NAME_CHARS),
                    output: clean(c.output.lines().next().unwrap_or(""), MAX_OUTPUT_CHARS),
                })
                .collect();
            (
                (
                    e.node.node.to_ascii_lowercase(),
                    service_id_key(&e.service.id),
                ),
                checks,
            )
        })
        .collect()
}

/// `text` without control characters (no escape sequence reaches a terminal, no line break a
/// log line), at most `max` characters (an ellipsis says it was cut).
pub(crate) fn clean(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max.saturating_add(1))
        .collect();
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_dropped_and_length_bounded() {
        assert_eq!(clean("ok\u{1b}[31mred\u{7}", 50), "ok[31mred");
        assert_eq!(clean("abcdef", 4), "abc…");
        assert_eq!(clean("abcd", 4), "abcd");
    }

    #[test]
    fn checks_are_keyed_as_instances_and_keep_the_first_output_line() {
        let json = r#"[{"Node":{"Node":"Node-1"},"Service":{"ID":"web-1"},
            "Checks":[{"Name":"http","Status":"critical","Output":"refused\nmore"},
                      {"CheckID":"serfHealth","Status":"passing"}]},
            {"Node":{"Node":"n2"},"Service":{"ID":"web-2"},"Checks":null}]"#;
        let entries: Vec<DetailEntry> = serde_json::from_str(json).expect("json");
        let by = by_instance(entries);
        let checks = &by[&("node-1".to_owned(), service_id_key("web-1"))];
        assert_eq!(checks[0].name, "http");
        assert_eq!(checks[0].output, "refused");
        assert_eq!(checks[1].name, "serfHealth");
        assert!(by[&("n2".to_owned(), service_id_key("web-2"))].is_empty());
    }
}
