#!/usr/bin/env bash
# Runs every test. Installs what the tests need when it is missing, via apt-get when running
# as root: dig and delv (bind9-dnsutils), promtool and prometheus (prometheus), nginx and
# getent/ip for the end-to-end tests (tests/it/e2e_*.rs), python3 with PyYAML for checking
# examples/kubernetes, and for the DNSSEC tests (tests/it/e2e_dnssec.rs) dnssec-keygen and
# dnssec-signzone (bind9-utils), nsd and unbound; headless chromium for the status page
# (tests/it/e2e_chromium.rs), curl and unshare for the debug-route test in a namespace, taskset
# for the binary pinned to one core (tests/it/cli_and_config_files.rs); for the
# packages (tests/it/packaging.rs) podman and runc (the container image), readelf (binutils) and
# dpkg-deb.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
{ command -v dig && command -v delv; } >/dev/null 2>&1 || need_pkgs+=(bind9-dnsutils)
command -v dnssec-signzone >/dev/null 2>&1 || need_pkgs+=(bind9-utils)
command -v nsd >/dev/null 2>&1 || [[ -x /usr/sbin/nsd ]] || need_pkgs+=(nsd)
command -v unbound >/dev/null 2>&1 || [[ -x /usr/sbin/unbound ]] || need_pkgs+=(unbound)
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx)
command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || need_pkgs+=(iproute2)
command -v getent >/dev/null 2>&1 || need_pkgs+=(libc-bin)
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || need_pkgs+=(python3-yaml)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
{ command -v unshare && command -v taskset; } >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
command -v runc >/dev/null 2>&1 || [[ -x /usr/sbin/runc ]] || need_pkgs+=(runc)
command -v readelf >/dev/null 2>&1 || need_pkgs+=(binutils)
command -v dpkg-deb >/dev/null 2>&1 || need_pkgs+=(dpkg)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages such as nginx, prometheus, nsd and unbound would start their services on
    # install; the tests start their own instances, so keep the package scripts from starting
    # anything.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    if ((created_policy)); then rm -f "$policy"; fi
  else
    echo "missing: ${need_pkgs[*]} — run as root or: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

# A failing test prints its assertion and where it failed, without a backtrace: CI keeps the
# tail of the output, and a backtrace per failure pushes the assertion's message out of it.
# TEST_BACKTRACE=1 scripts/test.sh brings them back (RUST_BACKTRACE from the environment is
# overridden: CI sets it).
export RUST_BACKTRACE=${TEST_BACKTRACE:-0}

# Every test but the two timing-sensitive modules, in parallel. Those two (Consul's connection
# budget under churn and restarts, health flips reaching every view within 2 s) measure
# latency on a shared 2-core machine: they run afterwards, one test at a time, so that no other
# test competes for the cores (as when each test file was its own binary, run in turn).
cargo test --lib --bins --tests --examples "$@" -- --skip health_churn:: --skip scale::
cargo test --benches "$@"
cargo test --test it "$@" -- --test-threads=1 health_churn:: scale::
# The soak run (about 60 s at ~20k queries/s) and the large-scale tests (scale, health churn,
# name flood) measure a release build, not a debug one, and the packaging tests ship it: they
# are the only ignored tests, and they run one at a time for the same reason.
cargo test --release --test it -- --ignored --nocapture --test-threads=1
# The README's third install path, `cargo install --locked --path .`, into a scratch root (the
# release build above is reused): the installed binary names this commit.
install_root=$(mktemp -d)
cargo install --locked --path . --root "$install_root" --target-dir "${CARGO_TARGET_DIR:-target}" --quiet
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
installed=$("$install_root/bin/consul-dns-forwarder" --version)
rm -rf "$install_root"
echo "cargo install: $installed"
[[ $installed == "consul-dns-forwarder $(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1) (revision $revision)" ]]
