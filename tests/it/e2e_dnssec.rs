//! DNSSEC through the forwarder binary, with real components (tests/support/dnssec.rs): a zone
//! signed at test time, served by NSD, validated by unbound, which the forwarder forwards to;
//! `delv` and `dig` ask the forwarder.

use crate::support::dnssec::{delv, Dig, Server, SignedZone};
use crate::support::e2e::Forwarder;
use crate::support::TestConfig;

/// The forwarder binary in front of `unbound` (`upstream` lines beyond the server in
/// `upstream_lines`), failures remembered for 3 s, then 6 s.
async fn forwarder(zone: &SignedZone, unbound: &Server, upstream_lines: &str) -> Forwarder {
    let conf = zone
        .dir
        .path()
        .join(format!("forwarder-{}.toml", upstream_lines.len()));
    TestConfig::new()
        .upstream(unbound.addr)
        .upstream_lines(upstream_lines)
        .cache("failure_ttl = \"3s\"\nfailure_ttl_max = \"6s\"")
        .consul_off()
        .write_to(&conf);
    Forwarder::spawn(&["--config", &conf.display().to_string()]).await
}

/// The signed zone, NSD serving it, unbound validating it, the forwarder in front.
async fn stack() -> (SignedZone, Server, Server, Forwarder) {
    let zone = SignedZone::build();
    let nsd = Server::nsd(&zone).await;
    let unbound = Server::unbound(&zone, &nsd).await;
    let fwd = forwarder(&zone, &unbound, "").await;
    (zone, nsd, unbound, fwd)
}

/// The answer section holds the A record and its RRSIG: the form a DO client gets.
fn assert_signed_a(reply: &Dig) {
    assert_eq!(Dig::types(&reply.answer), ["A", "RRSIG"], "{}", reply.text);
}

const WWW: &str = "www.signed.example.";
const MAIL: &str = "mail.signed.example.";
const BOGUS: &str = "bogus.signed.example.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delv_validates_through_the_forwarder_and_each_client_gets_its_form() {
    let (zone, _nsd, unbound, fwd) = stack().await;

    // delv checks every signature itself (it asks with DO and CD, and fetches the DNSKEYs
    // through us too): a signed name and a signed NXDOMAIN, whose NSEC proofs must arrive.
    let out = delv(fwd.port, &zone, WWW, "A").await;
    assert!(out.contains("; fully validated"), "{out}");
    assert!(out.contains("192.0.2.10"), "{out}");
    let out = delv(fwd.port, &zone, "nothere.signed.example.", "A").await;
    assert!(
        out.contains("; negative response, fully validated"),
        "{out}"
    );
    assert!(out.contains("NSEC"), "{out}");

    // A client that knows nothing of DNSSEC (no DO, no AD: nginx, glibc) gets neither AD nor
    // signatures; dig's default (AD set in the query, RFC 6840 §5.7) gets AD, no signatures.
    let plain = Dig::ask(fwd.port, &["+noadflag", MAIL, "A"]).await;
    assert_eq!(plain.status, "NOERROR", "{}", plain.text);
    assert!(!plain.has_flag("ad"), "{}", plain.text);
    assert_eq!(Dig::types(&plain.answer), ["A"]);
    let adflag = Dig::ask(fwd.port, &[MAIL, "A"]).await;
    assert!(adflag.has_flag("ad"), "{}", adflag.text);
    assert_eq!(Dig::types(&adflag.answer), ["A"]);
    assert_eq!(unbound.queries_for(MAIL, "A"), 1, "one entry for both");
    // DO: AD, the RRSIG, DO echoed. The cached form without signatures is not it: asked again.
    let signed = Dig::ask(fwd.port, &["+dnssec", MAIL, "A"]).await;
    assert!(signed.has_flag("ad"), "{}", signed.text);
    assert_signed_a(&signed);
    assert_eq!(signed.edns_flags, ["do"]);
    assert_eq!(unbound.queries_for(MAIL, "A"), 2);
    // From now on one entry serves both, each its own form.
    for _ in 0..2 {
        let plain = Dig::ask(fwd.port, &["+noadflag", MAIL, "A"]).await;
        assert_eq!(Dig::types(&plain.answer), ["A"], "{}", plain.text);
        assert!(!plain.has_flag("ad"));
        let signed = Dig::ask(fwd.port, &["+dnssec", MAIL, "A"]).await;
        assert_signed_a(&signed);
    }
    assert_eq!(
        unbound.queries_for(MAIL, "A"),
        2,
        "both forms from the cache"
    );

    // A negative answer: with DO the NSEC proofs and their signatures, without only the SOA.
    let gone = "gone.signed.example.";
    let signed = Dig::ask(fwd.port, &["+dnssec", gone, "A"]).await;
    assert_eq!(signed.status, "NXDOMAIN");
    assert!(signed.has_flag("ad"));
    let types = Dig::types(&signed.authority);
    assert!(
        types.contains(&"SOA") && types.contains(&"NSEC"),
        "{}",
        signed.text
    );
    assert_eq!(
        types.iter().filter(|t| **t == "RRSIG").count(),
        types.len() / 2
    );
    let plain = Dig::ask(fwd.port, &["+noadflag", gone, "A"]).await;
    assert_eq!(plain.status, "NXDOMAIN");
    assert_eq!(Dig::types(&plain.authority), ["SOA"], "{}", plain.text);
    assert_eq!(
        unbound.queries_for(gone, "A"),
        1,
        "the DO entry serves both"
    );

    // A forwarder that does not trust its upstream's AD passes the signatures on, never AD.
    let untrusting = forwarder(&zone, &unbound, "trust_ad = false").await;
    let signed = Dig::ask(untrusting.port, &["+dnssec", WWW, "A"]).await;
    assert_signed_a(&signed);
    assert!(!signed.has_flag("ad"), "{}", signed.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_name_fails_once_per_backoff_period_and_cd_clients_get_its_data() {
    let (zone, _nsd, unbound, fwd) = stack().await;

    // The validating upstream answers SERVFAIL; the forwarder remembers it for 3 s.
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let r = Dig::ask(fwd.port, &["+dnssec", BOGUS, "A"]).await;
        assert_eq!(r.status, "SERVFAIL", "{}", r.text);
        assert!(r.answer.is_empty());
    }
    let in_first = started.elapsed();
    assert!(in_first < std::time::Duration::from_secs(3), "{in_first:?}");
    assert_eq!(unbound.queries_for(BOGUS, "A"), 1);
    tokio::time::sleep(std::time::Duration::from_secs(3).saturating_sub(in_first)).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..5 {
        let r = Dig::ask(fwd.port, &["+noadflag", BOGUS, "A"]).await;
        assert_eq!(r.status, "SERVFAIL");
    }
    let asked = unbound.queries_for(BOGUS, "A");
    println!(
        "{BOGUS}: 15 queries over {:.1} s, unbound asked {asked} times (periods of 3 s, then 6 s)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(asked, 2);

    // With CD the client validates itself: it gets the data (and its failing signature), from
    // an entry of its own; clients without CD still get SERVFAIL.
    let cd = Dig::ask(fwd.port, &["+cd", BOGUS, "A"]).await;
    assert_eq!(cd.status, "NOERROR", "{}", cd.text);
    assert!(cd.has_flag("cd") && !cd.has_flag("ad"));
    assert_eq!(cd.answer[0].2, "192.0.2.67");
    let cd_signed = Dig::ask(fwd.port, &["+cd", "+dnssec", BOGUS, "A"]).await;
    assert_signed_a(&cd_signed);
    let again = Dig::ask(fwd.port, &[BOGUS, "A"]).await;
    assert_eq!(again.status, "SERVFAIL", "the CD answer is not the others'");
    // delv asks with CD, gets the data through us and finds the signature bad.
    let out = delv(fwd.port, &zone, BOGUS, "A").await;
    assert!(!out.contains("fully validated"), "{out}");
    assert!(out.contains("resolution failed"), "{out}");
}
