//! The integration tests, as one binary with a module per topic: one binary links the crate and
//! `tests/support` once, where a binary per file linked them once each.
//!
//! Run one topic with its module path, e.g. `cargo test --test it forwarding::`. The tests marked
//! `#[ignore = "run by scripts/test.sh in release mode"]` (soak, scale, health churn, name flood)
//! measure a release build, and packaging:: packages it:
//! `cargo test --release --test it -- --ignored --nocapture`.

#[path = "../support/mod.rs"]
mod support;

// The forwarder's own behaviour over real sockets.
mod consul_compatibility;
mod consul_consistency;
mod consul_encoded;
mod consul_names;
mod consul_parity_addrs;
mod consul_parity_names;
mod consul_parity_records;
mod consul_ptr;
mod dnssec_bits;
mod explain;
mod failure_cache;
mod faults_and_limits;
mod forwarding;
mod logs;
mod operations;
mod untrusted_names;

// The real binary, and real clients (dig, glibc, nginx) against it.
mod check_config;
mod cli_and_config_files;
mod e2e_chromium;
mod e2e_dig_consul_names;
mod e2e_dnssec;
mod e2e_dont_fragment;
mod e2e_glibc;
mod e2e_nginx;
mod shipped_examples;
mod systemd;

// The Debian package and the container image, built and installed (release pass).
mod packaging;

// Hostile input and fuzzing.
mod fuzz_packets;
mod hostile_files_and_consul;
mod hostile_packets;

// Load, scale and long runs (the large ones ignored outside release).
mod health_churn;
mod name_flood;
mod scale;
mod soak;

// The test doubles prove themselves, so the tests above can trust them.
mod consul_sim_selftest;
mod upstream_selftest;
