//! An [`Explanation`] for a person: plain text for the terminal (control characters stripped,
//! so check output cannot send escape sequences) and HTML for the status page (every string
//! escaped by `html-escape`), and a reply as dig prints it.

use std::fmt::Write;

use hickory_proto::op::Message;
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text_html};

use super::names::NameAnswer;
use super::{ConsulPart, Explanation, ForwardedPart, InstanceExplanation};
use crate::metrics::rcode_label;

/// `text` without control characters other than line feeds and tabs: what reaches a terminal.
pub(crate) fn terminal_safe(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

/// A reply as dig prints it (header, flags, sections).
pub(crate) fn dig(m: &Message) -> String {
    let md = &m.metadata;
    let mut out = String::new();
    let _ = writeln!(
        out,
        ";; ->>HEADER<<- opcode: {}, status: {}, id: {}",
        format!("{:?}", md.op_code).to_uppercase(),
        rcode_label(md.response_code),
        md.id
    );
    let flags: Vec<&str> = [
        (true, "qr"),
        (md.authoritative, "aa"),
        (md.truncation, "tc"),
        (md.recursion_desired, "rd"),
        (md.recursion_available, "ra"),
        (md.authentic_data, "ad"),
        (md.checking_disabled, "cd"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let _ = writeln!(
        out,
        ";; flags: {}; QUERY: {}, ANSWER: {}, AUTHORITY: {}, ADDITIONAL: {}",
        flags.join(" "),
        m.queries.len(),
        m.answers.len(),
        m.authorities.len(),
        m.additionals.len() + usize::from(m.edns.is_some())
    );
    if let Some(edns) = &m.edns {
        let _ = writeln!(
            out,
            ";; OPT PSEUDOSECTION: EDNS: version: {}, udp: {}",
            edns.version(),
            edns.max_payload()
        );
    }
    let _ = writeln!(out, "\n;; QUESTION SECTION:");
    for q in &m.queries {
        let _ = writeln!(
            out,
            ";{}\t\t{}\t{}",
            q.name(),
            q.query_class(),
            q.query_type()
        );
    }
    for (title, records) in [
        ("ANSWER", &m.answers),
        ("AUTHORITY", &m.authorities),
        ("ADDITIONAL", &m.additionals),
    ] {
        if records.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n;; {title} SECTION:");
        for r in records.iter() {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}",
                r.name,
                r.ttl,
                r.dns_class,
                r.record_type(),
                r.data
            );
        }
    }
    out
}

/// The explanation as text for a terminal.
pub(crate) fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let r = &e.reading;
    let _ = writeln!(out, "{} {}", e.name, e.qtype);
    let _ = write!(out, "  read as: {} via {}", r.kind, r.source);
    if let Some(s) = &r.service {
        let _ = write!(out, ", service {s}");
    }
    if let Some(t) = &r.tag {
        let _ = write!(out, ", tag {t}");
    }
    if let Some(dc) = &r.datacenter {
        let _ = write!(out, ", datacenter {dc}");
    }
    let _ = writeln!(out, ", zone {}", r.zone);
    if let Some(c) = &e.consul {
        consul_text(&mut out, c);
    }
    if let Some(f) = &e.forwarded {
        forwarded_text(&mut out, f);
    }
    let reply = &e.reply;
    let _ = writeln!(
        out,
        "\nreply now ({} ms){}:",
        reply.latency_ms,
        reply
            .error
            .as_deref()
            .map_or(String::new(), |err| format!(": {err}"))
    );
    out.push_str(&reply.text);
    terminal_safe(&out)
}

fn consul_text(out: &mut String, c: &ConsulPart) {
    let _ = writeln!(out, "  TTL: {} s from {}", c.ttl.seconds, c.ttl.from);
    let rules = &c.rules;
    let _ = writeln!(
        out,
        "  rules: only_passing = {}, when_none_healthy = {}, a_record_limit = {}, udp_answer_limit = {}{}",
        rules.only_passing,
        if rules.when_none_healthy_all { "\"all\"" } else { "\"nxdomain\"" },
        rules.a_record_limit,
        rules.udp_answer_limit,
        if rules.without_edns { " (asked as a client without EDNS)" } else { "" }
    );
    if let Some(a) = &c.answered_by {
        answered_text(out, a);
    } else if let Some(why) = &c.no_view {
        let _ = writeln!(out, "  view: none: {why}");
    }
    if let Some(v) = &c.view {
        let _ = writeln!(
            out,
            "  view: {} healthy, {} warning, {} critical; {}; kept fresh by {}",
            v.healthy,
            v.warning,
            v.critical,
            v.age_seconds
                .map_or("never confirmed by Consul".to_owned(), |a| format!(
                    "confirmed {a} s ago"
                )),
            v.kept_fresh_by
        );
        if v.consul_index.is_some() || v.agent.is_some() {
            let _ = writeln!(
                out,
                "        X-Consul-Index {}, agent {}, Consul last reached {}",
                v.consul_index.map_or("-".to_owned(), |i| i.to_string()),
                v.agent.as_deref().unwrap_or("-"),
                v.consul_contact_seconds
                    .map_or("never".to_owned(), |s| format!("{s} s ago"))
            );
        }
        let _ = writeln!(
            out,
            "  instances ({} in all, page {} of {}; checks {}):",
            c.instance_count, c.page, c.pages, c.checks_from
        );
        for i in &c.instances {
            instance_text(out, i);
        }
    }
}

/// What answers a node, prepared query, `.addr` or reverse name.
fn answered_text(out: &mut String, a: &NameAnswer) {
    let _ = writeln!(out, "  answered by: {}", a.summary);
    if let Some(n) = &a.node {
        let _ = writeln!(
            out,
            "  node {}: A {}, AAAA {}{}; meta ({} in all{}): {}",
            n.node,
            n.ipv4.as_deref().unwrap_or("-"),
            n.ipv6.as_deref().unwrap_or("-"),
            n.host
                .as_deref()
                .map_or(String::new(), |h| format!(", CNAME {h}")),
            n.meta_count,
            if n.meta_txt_in_additional {
                ", also as TXT beside A/AAAA answers"
            } else {
                ""
            },
            n.meta.join(", ")
        );
    }
    if let Some(q) = &a.query {
        let _ = writeln!(
            out,
            "  {} ({}; {})",
            q.filters,
            if q.keeps_order {
                "answers keep Consul's order"
            } else {
                "answers are shuffled"
            },
            q.ttl_seconds
                .map_or("no DNS.TTL".to_owned(), |t| format!("DNS.TTL {t} s"))
        );
        for i in &q.instances {
            let _ = writeln!(out, "    {} {}:{} {}", i.node, i.address, i.port, i.status);
        }
    }
}

fn instance_text(out: &mut String, i: &InstanceExplanation) {
    let mark = if i.in_answer { "+" } else { "-" };
    let _ = writeln!(
        out,
        "  {mark} {} {}:{} {}: {}",
        i.node, i.address, i.port, i.status, i.why
    );
    for c in &i.checks {
        let _ = writeln!(
            out,
            "      check \"{}\": {}{}",
            c.name,
            c.status,
            if c.output.is_empty() {
                String::new()
            } else {
                format!(": {}", c.output)
            }
        );
    }
}

fn forwarded_text(out: &mut String, f: &ForwardedPart) {
    let _ = writeln!(
        out,
        "  forwarded to zone {}: {}",
        f.zone,
        if f.upstreams.is_empty() {
            "no upstreams".to_owned()
        } else {
            f.upstreams.join(", ")
        }
    );
    let c = &f.cache;
    let _ = write!(out, "  cache (before asking): {}", c.state);
    if let Some(rcode) = &c.rcode {
        let _ = write!(out, " {rcode}");
    }
    if let (Some(age), Some(left)) = (c.age_seconds, c.ttl_remaining_seconds) {
        let _ = write!(out, ", stored {age} s ago, {left} s of TTL left");
    }
    if let Some(stale) = c.stale_for_seconds {
        let _ = write!(out, ", stale for {stale} s");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  last upstream answer (before asking): {}",
        f.last_answer.summary
    );
    if f.failure_remembered {
        let _ = writeln!(
            out,
            "  an upstream failure is remembered: answered SERVFAIL without asking"
        );
    }
}

/// `value` percent-encoded for a URL's query string.
pub(crate) fn query_value(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// The explain page's URL for `name` and `qtype`, escaped for an attribute.
pub(crate) fn explain_href(name: &str, qtype: &str, page: Option<usize>) -> String {
    let mut href = format!(
        "/explain?format=html&name={}&type={}",
        query_value(name),
        query_value(qtype)
    );
    if let Some(p) = page {
        let _ = write!(href, "&page={p}");
    }
    attr(&href).into_owned()
}

/// A whole HTML page around `body` (already escaped), refreshing itself every `refresh`
/// seconds when given.
pub(crate) fn page(title: &str, refresh: Option<u32>, body: &str) -> String {
    let meta = refresh.map_or(String::new(), |s| {
        format!("<meta http-equiv=\"refresh\" content=\"{s}\">")
    });
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{}</title>\
         <style>{STYLE}</style></head><body>\n{body}</body></html>\n",
        text_html(title)
    )
}

/// The pages' only style: inline, no external assets.
const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.out{color:#060}.crit{color:#a00}.warn{color:#a60}\
pre{background:#f7f7f7;padding:.6em;overflow-x:auto}";

/// The explanation as an HTML page.
pub(crate) fn html(e: &Explanation) -> String {
    let mut b = String::new();
    let r = &e.reading;
    let _ = writeln!(
        b,
        "<h1>explain {} {}</h1>\n<p><a href=\"/\">status page</a></p>",
        text_html(&e.name),
        text_html(&e.qtype)
    );
    let _ = writeln!(
        b,
        "<p id=\"reading\">read as <b>{}</b> via {}{}{}; zone {}</p>",
        text_html(&r.kind),
        text_html(&r.source),
        r.service.as_deref().map_or(String::new(), |s| format!(
            ", service <b>{}</b>",
            text_html(s)
        )),
        r.tag
            .as_deref()
            .map_or(String::new(), |t| format!(", tag <b>{}</b>", text_html(t))),
        text_html(&r.zone)
    );
    if let Some(c) = &e.consul {
        consul_html(&mut b, e, c);
    }
    if let Some(f) = &e.forwarded {
        let mut t = String::new();
        forwarded_text(&mut t, f);
        let _ = writeln!(b, "<pre id=\"forwarded\">{}</pre>", text_html(&t));
    }
    let _ = writeln!(
        b,
        "<h2>reply now ({} ms)</h2>\n<pre id=\"reply\">{}{}</pre>",
        e.reply.latency_ms,
        text_html(e.reply.error.as_deref().unwrap_or("")),
        text_html(&e.reply.text)
    );
    page(&format!("explain {}", e.name), None, &b)
}

fn consul_html(b: &mut String, e: &Explanation, c: &ConsulPart) {
    let mut summary = String::new();
    consul_text(
        &mut summary,
        &ConsulPart {
            instances: Vec::new(),
            ..c.clone()
        },
    );
    let _ = writeln!(b, "<pre id=\"summary\">{}</pre>", text_html(&summary));
    if c.view.is_none() {
        return;
    }
    let _ = writeln!(
        b,
        "<table id=\"instances\"><tr><th>in answer</th><th>node</th><th>address</th><th>port</th>\
         <th>status</th><th>why</th><th>checks</th></tr>"
    );
    for i in &c.instances {
        let class = match i.status.as_str() {
            "critical" => "crit",
            "warning" => "warn",
            _ => "out",
        };
        let checks: Vec<String> = i
            .checks
            .iter()
            .map(|k| {
                format!(
                    "{}: {}{}",
                    text_html(&k.name),
                    text_html(&k.status),
                    if k.output.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", text_html(&k.output))
                    }
                )
            })
            .collect();
        let _ = writeln!(
            b,
            "<tr class=\"instance\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"{class}\">{}</td><td>{}</td><td>{}</td></tr>",
            if i.in_answer { "yes" } else { "no" },
            text_html(&i.node),
            text_html(&i.address),
            i.port,
            text_html(&i.status),
            text_html(&i.why),
            checks.join("<br>")
        );
    }
    let _ = writeln!(b, "</table>");
    if c.pages > 1 {
        let links: Vec<String> = (1..=c.pages.min(super::gather::MAX_PAGE))
            .map(|p| {
                if p == c.page {
                    format!("<b>{p}</b>")
                } else {
                    format!(
                        "<a href=\"{}\">{p}</a>",
                        explain_href(&e.name, &e.qtype, Some(p))
                    )
                }
            })
            .collect();
        let _ = writeln!(b, "<p>pages: {}</p>", links.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::{CheckInfo, ConsulPart, ViewInfo};

    fn with_check(output: &str) -> Explanation {
        Explanation {
            name: "web.service.consul.".into(),
            qtype: "A".into(),
            consul: Some(ConsulPart {
                view: Some(ViewInfo::default()),
                instances: vec![InstanceExplanation {
                    node: "n1".into(),
                    checks: vec![CheckInfo {
                        name: "http".into(),
                        status: "critical".into(),
                        output: output.into(),
                    }],
                    ..InstanceExplanation::default()
                }],
                ..ConsulPart::default()
            }),
            ..Explanation::default()
        }
    }

    #[test]
    fn html_keeps_check_output_as_text() {
        let page = html(&with_check("<script>alert(1)</script>"));
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }

    #[test]
    fn terminal_text_has_no_escape_sequences() {
        let out = text(&with_check("bad\u{1b}]0;owned\u{7}\u{1b}[2J"));
        assert!(!out
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
        assert!(out.contains("bad]0;owned[2J"));
    }

    #[test]
    fn explain_links_encode_the_name() {
        assert_eq!(
            explain_href("a&b\"<.consul", "A", Some(2)),
            "/explain?format=html&amp;name=a%26b%22%3C.consul&amp;type=A&amp;page=2"
        );
    }
}
