//! A real DNSSEC stack for the end-to-end tests, built from Debian's tools at test time: a zone
//! signed with `dnssec-keygen` and `dnssec-signzone` (bind9-utils, keys in a temporary
//! directory), served by NSD, behind a validating unbound that holds the zone's trust anchor.
//! Clients are `dig` and `delv` (bind9-dnsutils). scripts/test.sh installs every one of them;
//! a missing one fails the test with the package to install.
//!
//! The zone `signed.example.`:
//!
//! | name                      | data                                               |
//! |---------------------------|----------------------------------------------------|
//! | `www.signed.example.`     | A 192.0.2.10                                       |
//! | `mail.signed.example.`    | A 192.0.2.11                                       |
//! | `bogus.signed.example.`   | A 192.0.2.67, changed after signing (was .66): its RRSIG fails |
//! | anything else             | NXDOMAIN, with NSEC proofs                         |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use super::e2e::sbin;
use super::{free_port, make_query, raw_udp, Running};

/// The signed zone's apex.
pub const ZONE: &str = "signed.example.";

/// Where NSD serves the zone, and where unbound listens (ports are picked at start).
const NSD_IP: &str = "127.0.0.120";
const UNBOUND_IP: &str = "127.0.0.121";

/// How long NSD or unbound may take to answer their first query.
const START_WITHIN: Duration = Duration::from_secs(10);

/// Panics with the Debian package to install when `program` is missing.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {program} || test -x /usr/sbin/{program}"),
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: scripts/test.sh installs Debian's {package} (run it as root), \
         or: apt-get install {package}"
    );
}

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The zone, signed in a temporary directory, and its trust anchor in the forms unbound and
/// delv read.
pub struct SignedZone {
    pub dir: tempfile::TempDir,
    /// The signed zone file, with `bogus` changed after signing.
    pub file: PathBuf,
    /// unbound's `trust-anchor-file`: the key-signing key's DNSKEY record.
    pub unbound_anchor: PathBuf,
    /// delv's `-a` file: `trust-anchors { signed.example. static-key ...; };`.
    pub delv_anchor: PathBuf,
}

impl SignedZone {
    pub fn build() -> SignedZone {
        require("dnssec-keygen", "bind9-utils");
        require("dnssec-signzone", "bind9-utils");
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        std::fs::write(
            d.join("zone"),
            "$TTL 300\n\
             @ IN SOA ns.signed.example. hostmaster.signed.example. 1 3600 600 86400 60\n\
             @ IN NS ns.signed.example.\n\
             ns IN A 127.0.0.120\n\
             www IN A 192.0.2.10\n\
             mail IN A 192.0.2.11\n\
             bogus IN A 192.0.2.66\n",
        )
        .expect("write zone");
        std::fs::create_dir(d.join("keys")).expect("mkdir");
        // A key-signing key, then a zone-signing key, ECDSA P-256: fast to make.
        let keygen = |role: &[&str]| {
            let mut args = vec!["-q", "-K", "keys", "-a", "ECDSAP256SHA256", "-n", "ZONE"];
            args.extend_from_slice(role);
            args.push(ZONE);
            run("dnssec-keygen", &args, d)
        };
        let ksk = keygen(&["-f", "KSK"]);
        keygen(&[]);
        run(
            "dnssec-signzone",
            &["-S", "-K", "keys", "-o", ZONE, "-f", "zone.signed", "zone"],
            d,
        );
        // A record changed after signing: its RRSIG no longer verifies.
        let signed = std::fs::read_to_string(d.join("zone.signed")).expect("signed zone");
        assert!(
            signed.contains("A\t192.0.2.66\n"),
            "the bogus record is in the signed zone"
        );
        let bogus = signed.replacen("A\t192.0.2.66\n", "A\t192.0.2.67\n", 1);
        std::fs::write(d.join("zone.signed"), bogus).expect("write");
        let key = std::fs::read_to_string(d.join("keys").join(format!("{}.key", ksk.trim())))
            .expect("KSK");
        let dnskey = key
            .lines()
            .find(|l| l.contains("DNSKEY"))
            .expect("DNSKEY line")
            .to_owned();
        std::fs::write(d.join("anchor.key"), format!("{dnskey}\n")).expect("write");
        // "signed.example. IN DNSKEY 257 3 13 <key in one or more words>"
        let fields: Vec<&str> = dnskey.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "DNSKEY").expect("DNSKEY") + 1;
        std::fs::write(
            d.join("anchors.conf"),
            format!(
                "trust-anchors {{\n  {ZONE} static-key {} {} {} \"{}\";\n}};\n",
                fields[at],
                fields[at + 1],
                fields[at + 2],
                fields[at + 3..].concat()
            ),
        )
        .expect("write");
        SignedZone {
            file: d.join("zone.signed"),
            unbound_anchor: d.join("anchor.key"),
            delv_anchor: d.join("anchors.conf"),
            dir,
        }
    }
}

/// A server child process (NSD or unbound) on a loopback address, in the foreground.
pub struct Server {
    pub addr: SocketAddr,
    /// unbound's log, one line per query received (`log-queries`).
    pub log: PathBuf,
    _child: Running,
}

/// Waits until `addr` answers a DNS query over UDP (any reply).
async fn wait_answering(addr: SocketAddr, what: &str, child: &mut Running, log: &Path) {
    let query = make_query(ZONE, RecordType::SOA, None)
        .to_vec()
        .expect("encode");
    let started = Instant::now();
    while started.elapsed() < START_WITHIN {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "{what} exited at start ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if raw_udp(addr, &query, Duration::from_millis(200))
            .await
            .is_some()
        {
            return;
        }
    }
    panic!("{what} did not answer on {addr} within {START_WITHIN:?}");
}

impl Server {
    /// Runs `program` (Debian's package of the same name; found in /usr/sbin even when that is
    /// not on PATH) in the foreground with the configuration `conf(port)` written to
    /// `<program>.conf` in the zone's directory, listening on `ip` and a free port, and waits
    /// until it answers. Its log is `<program>.log` there.
    async fn start(
        zone: &SignedZone,
        program: &str,
        ip: &str,
        conf: impl Fn(u16) -> String,
    ) -> Server {
        require(program, program);
        let port = free_port();
        let path = zone.dir.path().join(format!("{program}.conf"));
        std::fs::write(&path, conf(port)).expect("write the configuration");
        let mut child = Running(
            Command::new(sbin(program))
                .args(["-d", "-c", &path.display().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{program} could not start: {e}")),
        );
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
        let log = zone.dir.path().join(format!("{program}.log"));
        wait_answering(addr, program, &mut child, &log).await;
        Server {
            addr,
            log,
            _child: child,
        }
    }

    /// NSD serving `zone` on 127.0.0.120, a free port.
    pub async fn nsd(zone: &SignedZone) -> Server {
        let d = zone.dir.path().display().to_string();
        Server::start(zone, "nsd", NSD_IP, |port| {
            format!(
                "server:\n  ip-address: {NSD_IP}\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n\
                 \x20 zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n\
                 \x20 xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n\
                 \x20 xfrdir: \"{d}\"\n  logfile: \"{d}/nsd.log\"\n  server-count: 1\n\
                 remote-control:\n  control-enable: no\n\
                 zone:\n  name: \"{ZONE}\"\n  zonefile: \"{}\"\n",
                zone.file.display()
            )
        })
        .await
    }

    /// A validating unbound on 127.0.0.121, a free port, with the zone's trust anchor and the
    /// zone stubbed to `nsd`; every query it receives is logged.
    pub async fn unbound(zone: &SignedZone, nsd: &Server) -> Server {
        let d = zone.dir.path().display().to_string();
        Server::start(zone, "unbound", UNBOUND_IP, |port| {
            format!(
                "server:\n  interface: {UNBOUND_IP}\n  port: {port}\n  username: \"\"\n\
                 \x20 chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n\
                 \x20 logfile: \"{d}/unbound.log\"\n  use-syslog: no\n  log-queries: yes\n\
                 \x20 num-threads: 1\n  do-not-query-localhost: no\n\
                 \x20 module-config: \"validator iterator\"\n\
                 \x20 trust-anchor-file: \"{}\"\n\
                 stub-zone:\n  name: \"{ZONE}\"\n  stub-addr: {}@{}\n\
                 remote-control:\n  control-enable: no\n",
                zone.unbound_anchor.display(),
                nsd.addr.ip(),
                nsd.addr.port()
            )
        })
        .await
    }

    /// How many queries for `name` `rtype` unbound has received (its `log-queries` lines:
    /// `info: <client> <name> <type> IN`).
    pub fn queries_for(&self, name: &str, rtype: &str) -> usize {
        let wanted = format!(" {name} {rtype} IN");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("info: ") && l.ends_with(&wanted))
            .count()
    }
}

/// What `dig` printed, read back: status, header flags, the OPT record's flags, and the
/// records of each section as (name, type, data).
#[derive(Debug, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    pub edns_flags: Vec<String>,
    pub answer: Vec<(String, String, String)>,
    pub authority: Vec<(String, String, String)>,
    pub text: String,
}

impl Dig {
    /// `dig @127.0.0.1 -p <port> +time=3 +tries=1 <args>`.
    pub async fn ask(port: u16, args: &[&str]) -> Dig {
        let out = tokio::process::Command::new("dig")
            .args(["@127.0.0.1", "-p", &port.to_string(), "+time=3", "+tries=1"])
            .args(args)
            .output()
            .await
            .expect("dig runs (bind9-dnsutils; scripts/test.sh installs it)");
        Dig::parse(&String::from_utf8_lossy(&out.stdout))
    }

    fn parse(text: &str) -> Dig {
        let mut dig = Dig {
            text: text.to_owned(),
            ..Dig::default()
        };
        let mut section = "";
        for line in text.lines() {
            if let Some((_, rest)) = line.split_once("status: ") {
                dig.status = rest.split(',').next().unwrap_or("").to_owned();
            } else if let Some((_, rest)) = line.split_once(";; flags: ") {
                let flags = rest.split(';').next().unwrap_or("");
                dig.flags = flags.split_whitespace().map(str::to_owned).collect();
            } else if let Some((_, rest)) = line.split_once("; EDNS: version: 0, flags:") {
                let flags = rest.split(';').next().unwrap_or("");
                dig.edns_flags = flags.split_whitespace().map(str::to_owned).collect();
            } else if let Some(name) = line.strip_prefix(";; ") {
                section = name.strip_suffix(" SECTION:").unwrap_or("");
            } else if !line.starts_with(';') && !line.trim().is_empty() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let record = (f[0].to_owned(), f[3].to_owned(), f[4..].join(" "));
                match section {
                    "ANSWER" => dig.answer.push(record),
                    "AUTHORITY" => dig.authority.push(record),
                    _ => {}
                }
            }
        }
        dig
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The types of a section's records, in order.
    pub fn types(records: &[(String, String, String)]) -> Vec<&str> {
        records.iter().map(|(_, t, _)| t.as_str()).collect()
    }
}

/// `delv @127.0.0.1 -p <port>` validating `name` `rtype` itself from the zone's trust anchor:
/// its output (stdout and stderr together).
pub async fn delv(port: u16, zone: &SignedZone, name: &str, rtype: &str) -> String {
    let out = tokio::process::Command::new("delv")
        .args(["@127.0.0.1", "-p", &port.to_string()])
        .arg("-a")
        .arg(&zone.delv_anchor)
        .args([&format!("+root={ZONE}"), name, rtype])
        .output()
        .await
        .expect("delv runs (bind9-dnsutils; scripts/test.sh installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
