//! A stable-Rust fuzz driver over `Handler::handle` (see docs/fuzzing.md): mutates the packet
//! corpus in a loop for `FUZZ_SECONDS` (3 s in an ordinary `cargo test` run), with the oracle of
//! `tests/support/hostile.rs`, over UDP and TCP. No sockets: the forwarder has no upstream
//! (forwarded names fail at once), Consul names come from the demo catalog.
//!
//! It has no coverage instrumentation; as cheap guidance, a mutant whose outcome (rcode, reply
//! size, the parser's error) was never seen before joins the pool. For coverage-guided runs use
//! the AFL++ or libFuzzer targets in `fuzz/`.
//!
//! ```sh
//! FUZZ_SECONDS=600 cargo test --release --test it fuzz_packets -- --nocapture
//! FUZZ_SEED=12345 FUZZ_SECONDS=60 cargo test --release --test it fuzz_packets -- --nocapture
//! FUZZ_CORPUS=/tmp/afl-out/default/queue FUZZ_SECONDS=60 cargo test --release --test it fuzz_packets
//! ```
//!
//! A failing input is written to `target/fuzz-findings/<hash>.bin`; copy it into
//! `tests/corpus/packets/` (with a name that says what it is) to replay it in every test run.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::hostile::*;
use consul_dns_forwarder::reply::Transport;
use futures::FutureExt;
use hickory_proto::op::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// How long one `cargo test` run fuzzes when FUZZ_SECONDS is not set.
const DEFAULT_SECONDS: u64 = 3;

/// The seed of an ordinary test run (fixed, so a failure in CI reproduces).
const DEFAULT_SEED: u64 = 0x5eed_0007;

/// A call that takes longer than this is a failure (nothing here waits on a network).
const CALL_BOUND: Duration = Duration::from_secs(2);

/// The pool never grows past this.
const MAX_POOL: usize = 20_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// What a packet's handling looked like, coarsely: new signatures make a mutant worth keeping.
fn signature(packet: &[u8], reply: Option<&[u8]>) -> (String, Option<u16>, usize) {
    let parse = match Message::from_vec(packet) {
        Ok(m) => format!(
            "ok q{} an{} ar{} edns{}",
            m.queries.len().min(3),
            m.answers.len().min(3),
            m.additionals.len().min(3),
            m.edns.is_some()
        ),
        // The error text without numbers: "label points to data not prior to idx", ...
        Err(e) => e
            .to_string()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect(),
    };
    let rcode = reply
        .and_then(|r| Message::from_vec(r).ok())
        .map(|m| u16::from(m.metadata.response_code));
    let size = reply.map_or(0, |r| r.len() / 64);
    (parse, rcode, size)
}

fn save_finding(packet: &[u8]) -> PathBuf {
    let mut h = DefaultHasher::new();
    packet.hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{:016x}.bin", h.finish()));
    let _ = std::fs::write(&path, packet);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_handler_with_mutated_packets() {
    let seconds = env_u64("FUZZ_SECONDS").unwrap_or(DEFAULT_SECONDS);
    let seed = env_u64("FUZZ_SEED").unwrap_or(if std::env::var_os("FUZZ_SECONDS").is_some() {
        rand::random()
    } else {
        DEFAULT_SEED
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let (handler, _registry) = in_process_handler(None, Duration::from_millis(10));

    let mut pool: Vec<Vec<u8>> = seeds();
    pool.extend(replay_set().into_iter().map(|(_, bytes, _)| bytes));
    if let Ok(dir) = std::env::var("FUZZ_CORPUS") {
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("FUZZ_CORPUS={dir}: {e}"));
        for f in files.filter_map(Result::ok).take(MAX_POOL) {
            if let Ok(bytes) = std::fs::read(f.path()) {
                if bytes.len() <= 65_535 {
                    pool.push(bytes);
                }
            }
        }
    }
    pool.retain(|p| !p.is_empty());
    let mut seen = HashSet::new();
    let budget = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut execs: u64 = 0;
    while start.elapsed() < budget {
        let packet = mutant(&mut rng, &pool);
        let mut keep = false;
        for transport in [Transport::Udp, Transport::Tcp] {
            let call =
                std::panic::AssertUnwindSafe(handler.handle(&packet, ALLOWED_CLIENT, transport))
                    .catch_unwind();
            let problem = match tokio::time::timeout(CALL_BOUND, call).await {
                Err(_) => Some(format!("no return within {CALL_BOUND:?}")),
                Ok(Err(_)) => Some("panicked (message above)".to_owned()),
                Ok(Ok(reply)) => {
                    keep |= seen.insert(signature(&packet, reply.as_deref()));
                    check_reply(&packet, reply.as_deref(), transport, true).err()
                }
            };
            if let Some(p) = problem {
                let path = save_finding(&packet);
                panic!(
                    "seed {seed} after {execs} executions, {transport:?}: {p}\npacket {}\nsaved as {}",
                    hex(&packet),
                    path.display()
                );
            }
            execs += 1;
        }
        if keep && pool.len() < MAX_POOL {
            pool.push(packet);
        }
    }
    eprintln!(
        "fuzzed {execs} executions in {:?} (seed {seed}), {} outcome signatures, pool {}",
        start.elapsed(),
        seen.len(),
        pool.len()
    );
    assert!(execs > 100, "only {execs} executions");
}
