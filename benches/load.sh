#!/usr/bin/env bash
# Load benchmark (issue 6): consul-dns-forwarder against the setups it replaces, on this machine,
# in one run, with the same data behind every contender.
#
#   benches/load.sh                       # as root: installs dnsperf, dnsmasq, unbound, dig if missing
#   BENCH_DURATION=30 benches/load.sh     # longer runs
#
# What runs (everything on 127.0.0.1, every process started here is stopped on exit):
#   - upstream: unbound with local-data for zone test. (h0..h99.test fixed, *.miss.test any name),
#   - Consul:   examples/bench_consul_sim.rs (the tests' Consul simulator) serving svc00..svc19
#               (3 instances each) over the HTTP API and an agent-style DNS port (TTL 0),
#   - contenders, one at a time, restarted for every scenario (fresh cache, fresh peak RSS):
#       limit      examples/limit_responder.rs: one canned answer to every question (the cost of
#                  a datagram in and one out; every table shows CPU per answer as a multiple of it)
#       limit-sized  the same, answering with as many A records as ours-http's reply carries
#                  (consul and large-* only): the kernel's cost of moving a datagram that size
#       ours-http  consul-dns-forwarder --consul-http <sim>
#       ours-dns   consul-dns-forwarder --consul-dns <sim dns>   (consul.mode = "dns")
#       ours-file  consul-dns-forwarder --catalog-file <the simulator's catalog, written as a file>
#                  (not in many-services or cold-start: 100,000 instances make a file of
#                  hundreds of MB, and a file has no watchers to start)
#       dnsmasq    server=/consul/<sim dns>, server=<upstream>, cache-size=100000
#       unbound    stub-zone consul -> <sim dns>, forward-zone . -> <upstream>
#       base-http, base-dns  as ours-http and ours-dns, with the BENCH_BASELINE_BIN binary
#   - the load: dnsperf, with -v so that p99 can be computed (dnsperf 2.10 has no histogram).
#
# Placement: the contender is pinned to BENCH_SERVER_CPU (default 0); dnsperf, the upstream and
# the simulator share BENCH_CLIENT_CPU (default 1). Only the contender's CPU time is "server CPU";
# the upstream's and simulator's are reported apart ("helpers").
#
# Scenarios (BENCH_SCENARIOS):
#   consul          svc00..svc19.service.consul A, repeated
#   fwd-hits        h0..h99.test A, repeated (cache hits after the first 100)
#   mix-10pct-miss  90% h*.test A, 10% unique <n>.miss.test A (cache misses)
#   hits-half-rate  fwd-hits at half of ours-http's fwd-hits queries/s (dnsperf -Q): latency
#   fill-100k       100,000 unique names once each, then peak RSS (issue 6's memory target)
#   large-service   issue 8: big.service.consul (5,000 instances) and small.service.consul (3), A,
#                   each without EDNS (512-byte replies) and with EDNS 1232: four runs,
#                   large-5000-udp512 large-3-udp512 large-5000-edns1232 large-3-edns1232 (each
#                   can also be named alone); CPU per answer 5000 / 3 (target <= 2x)
#   many-services   issue 8: 10,000 services x 10 instances, all 10,000 names round robin;
#                   Consul requests, peak connections to the simulator, RSS (target <= 64 MiB)
#   cold-start      issue 8: the same 10,000 names asked once each from a fresh start, 400 in
#                   flight at a time (a fleet of clients); every name answered within 3 s, no
#                   SERVFAIL, at most 32 connections to Consul (ours-http, ours-dns and base-* only: the
#                   others have no watchers to start)
#   The issue 8 scenarios get a simulator of their own per run (started before the contender,
#   stopped after it), so its counters (peak connections) belong to that run alone. Like a real
#   agent, its DNS port has udp_answer_limit 3 and its nodes carry consul-network-segment meta.
#
# Environment: BENCH_DURATION (s per run, default 10), BENCH_ROUNDS (default 3: every scenario is
# run this many times per contender, contenders interleaved, and medians reported), BENCH_CONTENDERS, BENCH_SCENARIOS,
# BENCH_SERVER_CPU, BENCH_CLIENT_CPU, BENCH_CLIENTS (dnsperf -c, default 10), BENCH_OUTSTANDING
# (dnsperf -q, default 100), BENCH_HALF_RATE (queries/s for hits-half-rate when ours-http's
# fwd-hits is not run), BENCH_PORT_BASE (default 25300; uses 3 ports), BENCH_OUT (result folder),
# BENCH_PERF=1 (after the table: perf profiles of ours-http in consul, fwd-hits and fill-100k, or
# in the scenarios of BENCH_PERF_SCENARIOS; of another contender with BENCH_PERF_CONTENDER),
# BENCH_KEEP_RAW=1 (keep dnsperf's per-query lines beside each summary, as dnsperf-*.raw: the
# latency of each query, say to split mix-10pct-miss's p99 into hits and misses),
# BENCH_RUST_LOG (RUST_LOG of ours-http and base-http, default warn; their logs go away with the run),
# BENCH_MANY_PASSES (many-services: passes over the 10,000 names, default 10),
# BENCH_BASELINE_BIN (another consul-dns-forwarder binary, say a release build of an older commit:
# adds the contenders base-http and base-dns, started as ours-http and ours-dns with the same
# config, and a section comparing ours with it; head before vs after a change in one run:
#   BENCH_BASELINE_BIN=/tmp/old/release/consul-dns-forwarder \
#     BENCH_CONTENDERS="ours-http base-http ours-dns base-dns" benches/load.sh).
#
# Output: the table on stdout and in $BENCH_OUT/results.md, raw numbers in results.tsv, dnsperf
# summaries and logs beside them. This is a benchmark, not a test: it is not part of
# scripts/test.sh or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-10}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
BASE_BIN=${BENCH_BASELINE_BIN:-}
CONTENDERS=${BENCH_CONTENDERS:-"limit limit-sized ours-http ours-dns ours-file ${BASE_BIN:+base-http base-dns }dnsmasq unbound"}
# Every scenario is in the default list, so one command prints every figure of issues 6 and 8
# (about 25 minutes at 3 rounds; BENCH_ROUNDS=1 for a quicker look).
SCENARIOS=${BENCH_SCENARIOS:-"consul fwd-hits mix-10pct-miss hits-half-rate fill-100k large-service many-services cold-start"}
CLIENTS=${BENCH_CLIENTS:-10}
OUTSTANDING=${BENCH_OUTSTANDING:-100}
PORT_BASE=${BENCH_PORT_BASE:-25300}
PERF=${BENCH_PERF:-0}
KEEP_RAW=${BENCH_KEEP_RAW:-0}
PERF_SCENARIOS=${BENCH_PERF_SCENARIOS:-"consul fwd-hits fill-100k"}
PERF_CONTENDER=${BENCH_PERF_CONTENDER:-ours-http}
ROUNDS=${BENCH_ROUNDS:-3}
SERVICES=20
INSTANCES=3
FWD_NAMES=100
FILL_NAMES=100000
# Issue 8's scenarios.
LARGE_INSTANCES=5000
LARGE_NAME=big.service.consul
SMALL_INSTANCES=3
MANY_SERVICES=10000
MANY_INSTANCES=10
# many-services: passes over the 10,000 names (the first one starts every watcher).
MANY_PASSES=${BENCH_MANY_PASSES:-10}
# cold-start: issue 8's bound on answering every one of the 10,000 names from a fresh start (s),
# and the queries in flight at once (tests/it/scale.rs asks through 400 sockets, one at a time
# each). A query unanswered after the bound counts as lost (dnsperf -t).
COLD_START_BOUND=3
COLD_START_OUTSTANDING=400
# Issue 8's connection budget: consul.max_connections' default.
CONSUL_MAX_CONNECTIONS=32
# A real agent's dns_config.udp_answer_limit default: what dnsmasq and unbound get from Consul.
CONSUL_UDP_ANSWER_LIMIT=3
# Lines in the mix file: enough for this many queries/s over the whole run without repeating a
# unique name (dnsperf runs through it once).
MIX_RATE_CAP=${BENCH_MIX_RATE_CAP:-200000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${BENCH_OUT:-$TARGET_DIR/bench-load/$(date +%Y%m%d-%H%M%S)}

PORT=$PORT_BASE               # the contender (UDP and TCP)
UP_PORT=$((PORT_BASE + 1))    # the upstream
METRICS_PORT=$((PORT_BASE + 2))

log() { printf '[load] %s\n' "$*" >&2; }
die() {
  printf '[load] error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- tools
need=()
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v dnsmasq >/dev/null 2>&1 || [[ -x /usr/sbin/dnsmasq ]] || need+=(dnsmasq-base)
command -v unbound >/dev/null 2>&1 || [[ -x /usr/sbin/unbound ]] || need+=(unbound)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
if ((${#need[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing ${need[*]}: run as root or: sudo apt-get install ${need[*]}"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin
for t in dnsperf dnsmasq unbound dig taskset getconf python3; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found"
done
CPUS=$(getconf _NPROCESSORS_ONLN)
((SERVER_CPU < CPUS && CLIENT_CPU < CPUS)) || die "CPUs $SERVER_CPU/$CLIENT_CPU: this machine has $CPUS"
HZ=$(getconf CLK_TCK)

for p in "$PORT" "$UP_PORT" "$METRICS_PORT"; do
  if ss -Hlnu "sport = :$p" 2>/dev/null | grep -q . || ss -Hlnt "sport = :$p" 2>/dev/null | grep -q .; then
    die "port $p is in use (set BENCH_PORT_BASE)"
  fi
done

log "building (release)"
timeout 1800 cargo build --release --quiet --bin consul-dns-forwarder --example bench_consul_sim --example limit_responder
BIN=$TARGET_DIR/release/consul-dns-forwarder
SIM_BIN=$TARGET_DIR/release/examples/bench_consul_sim
LIMIT_BIN=$TARGET_DIR/release/examples/limit_responder
[[ -x $BIN && -x $SIM_BIN && -x $LIMIT_BIN ]] || die "build output not found under $TARGET_DIR"
if [[ " $CONTENDERS " == *" base-"* ]]; then
  [[ -n $BASE_BIN && -x $BASE_BIN ]] || die "contenders base-http and base-dns need BENCH_BASELINE_BIN (an executable)"
fi

mkdir -p "$OUT"
W=$(mktemp -d /tmp/cdf-load.XXXXXX)

# ---------------------------------------------------------------- process bookkeeping
PIDS=()
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
stop_pid() { # pid: TERM, up to 5 s, then KILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
cleanup() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

cpu_ticks() { # utime+stime of a process (all threads), in clock ticks
  [[ -r /proc/$1/stat ]] || {
    echo 0
    return
  }
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
peak_rss_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

wait_dns() { # port name: until it answers NOERROR (10 s at most)
  local i
  for ((i = 0; i < 100; i++)); do
    if dig +tries=1 +time=1 @127.0.0.1 -p "$1" "$2" A 2>/dev/null | grep -q 'status: NOERROR'; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- upstream (unbound, zone test.)
# shellcheck source=benches/support/unbound.sh
source "$ROOT/benches/support/unbound.sh"

{
  unbound_server "$UP_PORT"
  cat <<EOF
  module-config: "iterator"
  local-zone: "test." static
  local-data: "test. 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60"
  local-zone: "miss.test." redirect
  local-data: "miss.test. 300 IN A 192.0.2.250"
EOF
  hit_names_data "$FWD_NAMES"
} >"$W/upstream.conf"
unbound-checkconf "$W/upstream.conf" >/dev/null || die "upstream config rejected"
taskset -c "$CLIENT_CPU" unbound -d -c "$W/upstream.conf" >"$W/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_dns "$UP_PORT" h1.test || die "upstream unbound did not start: $(cat "$W/upstream.log")"

# ---------------------------------------------------------------- Consul simulator
# One simulator at a time: the shared one (svc00..svc19) for the issue 6 scenarios, or one per
# run for the issue 8 scenarios (start_sim large|many), which restores the shared one after.
SIM_PID=
SIM_KIND=
start_sim() { # kind: shared | large | many
  local args=()
  case $1 in
  shared) args=(--services "$SERVICES" --instances "$INSTANCES") ;;
  large) args=(--services 0 --large-service "big=$LARGE_INSTANCES" --large-service "small=$SMALL_INSTANCES") ;;
  many) args=(--services "$MANY_SERVICES" --instances "$MANY_INSTANCES") ;;
  *) die "unknown simulator $1" ;;
  esac
  # Issue 8's catalogs look like a real agent's: Consul's default udp_answer_limit, and the
  # node meta every agent registers (the forwarder used to copy it into every instance).
  [[ $1 == shared ]] || args+=(--dns-udp-answer-limit "$CONSUL_UDP_ANSWER_LIMIT" --node-meta consul-network-segment=)
  # ours-file's catalog: the same instances, as a file (not for many: see ours-file above).
  rm -f "$W/sim.addr" "$W/sim.stats" "$W/catalog.json"
  [[ $1 == many ]] || args+=(--catalog-file-out "$W/catalog.json")
  taskset -c "$CLIENT_CPU" "$SIM_BIN" "${args[@]}" \
    --addr-file "$W/sim.addr" --stats-file "$W/sim.stats" --max-seconds 7200 >"$W/sim.log" 2>&1 &
  SIM_PID=$!
  SIM_KIND=$1
  PIDS+=("$SIM_PID")
  for ((i = 0; i < 300; i++)); do
    [[ -s $W/sim.addr && -s $W/sim.stats ]] && break
    sleep 0.1
  done
  [[ -s $W/sim.addr ]] || die "simulator did not start: $(cat "$W/sim.log")"
  SIM_HTTP=$(sed -n 's/^http=//p' "$W/sim.addr")
  SIM_DNS=$(sed -n 's/^dns=//p' "$W/sim.addr")
  SIM_DNS_PORT=${SIM_DNS##*:}
  # dnsmasq's and unbound's files name the simulator's DNS port.
  write_configs
}
use_sim() { # kind: (re)starts the simulator unless it is already this shared one
  [[ $1 == shared && $SIM_KIND == shared ]] && return 0
  [[ -n $SIM_PID ]] && stop_pid "$SIM_PID"
  start_sim "$1"
}
sim_stat() { # http_requests | dns_queries | max_connections | open_connections
  awk -v k="$1" '$1 == k {print $2}' "$W/sim.stats" 2>/dev/null || echo 0
}

# ---------------------------------------------------------------- query files
for ((i = 0; i < SERVICES; i++)); do printf 'svc%02d.service.consul A\n' "$i"; done >"$W/q-consul.txt"
for ((i = 0; i < FWD_NAMES; i++)); do echo "h$i.test A"; done >"$W/q-hits.txt"
awk -v n=$((DURATION * MIX_RATE_CAP)) -v names=$FWD_NAMES 'BEGIN {
  srand(6);
  for (i = 0; i < n; i++) {
    if (i % 10 == 9) printf "u%d.miss.test A\n", i;
    else printf "h%d.test A\n", int(rand() * names);
  }
}' >"$W/q-mix.txt"
awk -v n=$FILL_NAMES 'BEGIN { for (i = 0; i < n; i++) printf "f%d.miss.test A\n", i }' >"$W/q-fill.txt"
echo "big.service.consul A" >"$W/q-big.txt"
echo "small.service.consul A" >"$W/q-small.txt"
for ((i = 0; i < MANY_SERVICES; i++)); do printf 'svc%02d.service.consul A\n' "$i"; done >"$W/q-many.txt"
# dnsperf -e offers 4096 bytes; EDNS 1232 (the DNS flag day size) needs the query as bytes
# (dnsperf -B: each message preceded by its 2-byte length, as over TCP).
edns_query() { # name size file
  python3 - "$@" <<'PY'
import struct, sys
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
qname = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
msg = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 1) + qname + struct.pack(">HH", 1, 1)
msg += b"\0" + struct.pack(">HHIH", 41, size, 0, 0)  # OPT: root owner, UDP size, no flags
open(out, "wb").write(struct.pack(">H", len(msg)) + msg)
PY
}
edns_query big.service.consul 1232 "$W/q-big-edns.bin"
edns_query small.service.consul 1232 "$W/q-small-edns.bin"

# ---------------------------------------------------------------- contenders
write_configs() {
  cat >"$W/ours.toml" <<EOF
[server]
listen = ["127.0.0.1:$PORT"]
[upstream]
servers = ["127.0.0.1:$UP_PORT"]
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
EOF
  cat >"$W/dnsmasq.conf" <<EOF
port=$PORT
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
server=/consul/127.0.0.1#$SIM_DNS_PORT
server=127.0.0.1#$UP_PORT
cache-size=100000
EOF
  {
    unbound_server "$PORT"
    cat <<EOF
  # No DNSSEC validation: none of the others validate either.
  module-config: "iterator"
  do-not-query-localhost: no
  domain-insecure: "consul."
  # test. is one of unbound's default local zones (RFC 6761); the benchmark's upstream serves it.
  local-zone: "test." nodefault
  # Room for fill-100k (the defaults are 4 MB / 4 MB).
  msg-cache-size: 64m
  rrset-cache-size: 128m
stub-zone:
  name: "consul."
  stub-addr: 127.0.0.1@$SIM_DNS_PORT
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$UP_PORT
EOF
  } >"$W/unbound.conf"
  unbound-checkconf "$W/unbound.conf" >/dev/null || die "unbound config rejected"
}
start_sim shared
log "upstream 127.0.0.1:$UP_PORT, Consul simulator $SIM_HTTP and DNS $SIM_DNS"

CPID=
bin_of() { [[ $1 == base-* ]] && echo "$BASE_BIN" || echo "$BIN"; } # contender: the binary it runs
# The A records ours-http's reply carries in scenario $1 (limit-sized answers with as many), or
# nothing for a scenario whose reply is a forwarded hit's size. A large service's reply holds
# what fits: 16 bytes a record after the header, the question and (with EDNS) the OPT record.
sized_records() {
  local question=$((${#LARGE_NAME} + 2 + 4))
  case $1 in
  consul) echo "$INSTANCES" ;;
  large-3-*) echo "$SMALL_INSTANCES" ;;
  large-5000-udp512) echo $(((512 - 12 - question) / 16)) ;;
  large-5000-edns1232) echo $(((1232 - 12 - question - 11) / 16)) ;;
  esac
}

start_contender() { # name [scenario]
  case $1 in
  ours-http | base-http)
    RUST_LOG=${BENCH_RUST_LOG:-warn} taskset -c "$SERVER_CPU" "$(bin_of "$1")" --config "$W/ours.toml" --consul-http "$SIM_HTTP" \
      >"$W/$1.log" 2>&1 &
    ;;
  ours-dns | base-dns)
    RUST_LOG=warn taskset -c "$SERVER_CPU" "$(bin_of "$1")" --config "$W/ours.toml" --consul-dns "$SIM_DNS" \
      >"$W/$1.log" 2>&1 &
    ;;
  ours-file)
    [[ -s $W/catalog.json ]] || die "no catalog file from the simulator for ours-file"
    RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" --config "$W/ours.toml" --catalog-file "$W/catalog.json" \
      >"$W/$1.log" 2>&1 &
    ;;
  limit)
    taskset -c "$SERVER_CPU" "$LIMIT_BIN" "127.0.0.1:$PORT" 7200 >"$W/$1.log" 2>&1 &
    ;;
  limit-sized)
    taskset -c "$SERVER_CPU" "$LIMIT_BIN" "127.0.0.1:$PORT" 7200 "$(sized_records "$2")" >"$W/$1.log" 2>&1 &
    ;;
  dnsmasq)
    taskset -c "$SERVER_CPU" dnsmasq -k -C "$W/dnsmasq.conf" >"$W/$1.log" 2>&1 &
    ;;
  unbound)
    taskset -c "$SERVER_CPU" unbound -d -c "$W/unbound.conf" >"$W/$1.log" 2>&1 &
    ;;
  *) die "unknown contender $1" ;;
  esac
  CPID=$!
  PIDS+=("$CPID")
  # A name of the upstream zone that no scenario asks for.
  wait_dns "$PORT" ready.miss.test || die "$1 did not start: $(cat "$W/$1.log")"
  # Whoever answered must be this contender (a process started since the port check could hold
  # the port, and the contender would have exited on the bind error).
  kill -0 "$CPID" 2>/dev/null || die "$1 exited at start (port $PORT taken?): $(cat "$W/$1.log")"
}

# ---------------------------------------------------------------- one run
COLUMNS_TSV='scenario\tcontender\tqps\tsent\tcompleted\tlost\tavg_ms\tp99_ms\tnoerror_pct\tcpu_us_per_q\thelpers_cpu_us_per_q\tpeak_rss_mib\tconsul_http\tconsul_dns\tconsul_per_mq\tcached'
# Added for issue 8, after the columns above (and, in results.tsv, after the min/max/rounds ones).
COLUMNS_TSV8='servfail\tsim_max_connections\trss_end_mib\tprobe\tother_rcodes'
RUNS=$OUT/runs.tsv # one row per run
TSV=$OUT/results.tsv # one row per scenario and contender: medians over the rounds
printf "round\t%b\t%b\n" "$COLUMNS_TSV" "$COLUMNS_TSV8" >"$RUNS"

# What one question gets from the contender, as dig sees it: "RCODE tc=0|1 an=N sizeB" (or
# "timeout"). Also the warm-up of the issue 8 runs (a first fetch is not steady state).
probe() { # name dig-options...
  local name=$1 out
  shift
  out=$(dig +tries=1 +time=10 +ignore "$@" @127.0.0.1 -p "$PORT" "$name" A 2>/dev/null) || true
  awk '
    /status:/ {st = $6; sub(",", "", st)}
    /^;; flags:/ {tc = ($0 ~ / tc[ ;]/) ? 1 : 0; for (i = 1; i <= NF; i++) if ($i == "ANSWER:") {an = $(i + 1); sub(",", "", an)}}
    /MSG SIZE/ {size = $NF}
    END {if (st == "") print "timeout"; else printf "%s tc=%d an=%d %dB\n", st, tc, an, size}' <<<"$out"
}

# The load of scenario $1: sets file (dnsperf's input), args (its extra arguments) and limit
# (its time limit), and makes sure the scenario's simulator runs.
scenario_load() {
  local sc=$1
  args=() limit=$DURATION outstanding=$OUTSTANDING query_timeout=2
  case $sc in
  consul) file=$W/q-consul.txt ;;
  fwd-hits) file=$W/q-hits.txt ;;
  mix-10pct-miss)
    file=$W/q-mix.txt
    args=(-n 1)
    ;;
  hits-half-rate)
    file=$W/q-hits.txt
    args=(-Q "$HALF_RATE")
    ;;
  fill-100k)
    file=$W/q-fill.txt
    args=(-n 1)
    limit=120
    ;;
  large-5000-udp512) file=$W/q-big.txt ;;
  large-3-udp512) file=$W/q-small.txt ;;
  large-5000-edns1232)
    file=$W/q-big-edns.bin
    args=(-B)
    ;;
  large-3-edns1232)
    file=$W/q-small-edns.bin
    args=(-B)
    ;;
  many-services)
    # Whole passes over the names, however slow the machine: the memory figure is for every
    # service watched.
    file=$W/q-many.txt
    args=(-n "$MANY_PASSES")
    limit=120
    ;;
  cold-start)
    file=$W/q-many.txt
    args=(-n 1)
    limit=120
    outstanding=$COLD_START_OUTSTANDING
    query_timeout=$COLD_START_BOUND
    ;;
  *) die "unknown scenario $sc" ;;
  esac
  case $sc in
  large-*) use_sim large ;;
  many-services | cold-start) use_sim many ;;
  *) use_sim shared ;;
  esac
}

run_one() { # scenario contender round
  local sc=$1 ct=$2 round=$3 file args limit outstanding query_timeout
  scenario_load "$sc"
  start_contender "$ct" "$sc"
  local h0 d0 c0 s0 u0 h1 d1 c1 s1 u1 rss rss_end cached="" probed="-" name
  case $sc in
  large-*)
    name=big.service.consul
    [[ $sc == large-3-* ]] && name=small.service.consul
    if [[ $sc == *-udp512 ]]; then probed=$(probe "$name" +noedns); else probed=$(probe "$name" +edns=0 +bufsize=1232); fi
    ;;
  esac
  sleep 0.3
  h0=$(sim_stat http_requests)
  d0=$(sim_stat dns_queries)
  c0=$(cpu_ticks "$CPID")
  s0=$(cpu_ticks "$SIM_PID")
  u0=$(cpu_ticks "$UP_PID")
  local raw=$W/dnsperf.raw sum=$OUT/dnsperf-$sc-$ct-$round.txt
  timeout $((limit + 60)) taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$PORT" -d "$file" \
    -l "$limit" -c "$CLIENTS" -q "$outstanding" -t "$query_timeout" "${args[@]}" -v >"$raw" 2>"$W/dnsperf.err" ||
    log "dnsperf exited non-zero for $sc/$ct: $(head -c 300 "$W/dnsperf.err")"
  c1=$(cpu_ticks "$CPID")
  s1=$(cpu_ticks "$SIM_PID")
  u1=$(cpu_ticks "$UP_PID")
  sleep 0.5 # the simulator writes its counters every 100 ms
  h1=$(sim_stat http_requests)
  d1=$(sim_stat dns_queries)
  rss=$(peak_rss_kb "$CPID")
  rss_end=$(awk '/^VmRSS:/{print $2}' "/proc/$CPID/status" 2>/dev/null || echo 0)
  if [[ $ct == ours-* || $ct == base-* ]] && command -v curl >/dev/null 2>&1; then
    curl -s --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" >"$W/metrics.txt" || true
    cached=$(awk '$1 == "consul_dns_forwarder_cache_entries" {print $2}' "$W/metrics.txt")
    if [[ $sc == many-services && ($ct == ours-http || $ct == base-http) ]]; then
      # Service fetches beyond one per name are refreshes on demand (a view without a blocking
      # query, asked again after its TTL): they grow with the run's length, and so its CPU.
      probed="watchers=$(awk '$1 == "consul_dns_forwarder_consul_watchers" {print $2}' "$W/metrics.txt")"
      probed+=" service-fetches=$(awk '$1 == "kind" && $2 == "/v1/health/service/*" {n += $4} END {print n + 0}' "$W/sim.stats")"
    fi
  fi
  stop_pid "$CPID"
  local max_conn
  max_conn=$(sim_stat max_connections)
  # A per-run simulator goes with its run: its backlog (dnsmasq's and unbound's questions) must
  # not eat into the next run's CPU.
  [[ $SIM_KIND == shared ]] || stop_pid "$SIM_PID"
  grep -v '^> ' "$raw" >"$sum" || true
  if [[ $KEEP_RAW == 1 ]]; then cp "$raw" "$OUT/dnsperf-$sc-$ct-$round.raw"; fi
  local p99
  p99=$(awk '$1 == ">" && NF == 5 && $5 ~ /^[0-9.]+$/ {print $5}' "$raw" | sort -n |
    awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else {i = int(NR * 0.99); if (i < NR * 0.99) i++; if (i < 1) i = 1; printf "%.3f", v[i] * 1000}}')
  rm -f "$raw"
  awk -v round="$round" -v sc="$sc" -v ct="$ct" -v hz="$HZ" -v cpu=$((c1 - c0)) -v helpers=$((s1 - s0 + u1 - u0)) \
    -v rss="$rss" -v http=$((h1 - h0)) -v dns=$((d1 - d0)) -v p99="$p99" -v cached="$cached" \
    -v max_conn="${max_conn:-0}" -v rss_end="${rss_end:-0}" -v probed="$probed" '
    /Queries sent:/ {sent = $3}
    /Queries completed:/ {done = $3}
    /Queries lost:/ {lost = $3}
    /Queries per second:/ {qps = $4}
    /Average Latency/ {avg = $4 * 1000}
    /Response codes:/ {
      for (i = 3; i <= NF; i += 3) {
        if ($i == "NOERROR") noerr = $(i + 1)
        if ($i == "SERVFAIL") servfail = $(i + 1)
        if ($i != "NOERROR") others = others (others == "" ? "" : ", ") $i " " $(i + 1)
      }
    }
    END {
      us = done > 0 ? cpu * 1e6 / hz / done : 0
      hus = done > 0 ? helpers * 1e6 / hz / done : 0
      permq = sent > 0 ? (http + dns) * 1e6 / sent : 0
      pct = done > 0 ? noerr * 100 / done : 0
      shown = cached == "" ? "-" : cached
      printf "%d\t%s\t%s\t%.0f\t%d\t%d\t%d\t%.3f\t%s\t%.2f\t%.2f\t%.2f\t%.1f\t%d\t%d\t%.1f\t%s\t%d\t%d\t%.1f\t%s\t%s\n",
        round, sc, ct, qps, sent, done, lost, avg, p99, pct, us, hus,
        rss / 1024, http, dns, permq, shown, servfail, max_conn, rss_end / 1024, probed,
        others == "" ? "-" : others
    }' "$sum" | tee -a "$RUNS" >&2
}

# Medians over the rounds (lost: summed; peak RSS: the highest; NOERROR: the lowest), with the
# spread of queries/s and CPU kept as min and max.
aggregate() {
  awk -F'\t' -v OFS='\t' -v header="$COLUMNS_TSV" -v header8="$COLUMNS_TSV8" '
    function median(list,   v, n, i, j, t) {
      n = split(list, v, " ")
      for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
      if (n == 0) return 0
      return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function lo(list,   v, n, i, m) { n = split(list, v, " "); m = v[1]; for (i = 2; i <= n; i++) if (v[i] + 0 < m + 0) m = v[i]; return m }
    function hi(list,   v, n, i, m) { n = split(list, v, " "); m = v[1]; for (i = 2; i <= n; i++) if (v[i] + 0 > m + 0) m = v[i]; return m }
    NR == 1 { next }
    {
      k = $2 SUBSEP $3
      if (!(k in first)) { first[k] = ++nk; key[nk] = k }
      for (c = 4; c <= 16; c++) col[k, c] = col[k, c] " " $c
      cached[k] = $17
      servfail[k] += $18
      if ($19 + 0 > maxconn[k] + 0) maxconn[k] = $19
      if ($20 + 0 > rssend[k] + 0) rssend[k] = $20
      probe[k] = $21
      others[k] = $22
    }
    END {
      print header "\tqps_min\tqps_max\tcpu_min\tcpu_max\trounds\t" header8
      for (i = 1; i <= nk; i++) {
        k = key[i]; split(k, sc, SUBSEP)
        n = split(col[k, 4], tmp, " ")
        s5 = 0; n5 = split(col[k, 5], v5, " "); for (j = 1; j <= n5; j++) s5 += v5[j]
        s6 = 0; n6 = split(col[k, 6], v6, " "); for (j = 1; j <= n6; j++) s6 += v6[j]
        s7 = 0; n7 = split(col[k, 7], v7, " "); for (j = 1; j <= n7; j++) s7 += v7[j]
        printf "%s\t%s\t%.0f\t%d\t%d\t%d\t%.3f\t%.3f\t%.2f\t%.2f\t%.2f\t%.1f\t%d\t%d\t%.1f\t%s\t%.0f\t%.0f\t%.2f\t%.2f\t%d\t%d\t%d\t%.1f\t%s\t%s\n",
          sc[1], sc[2], median(col[k, 4]), s5, s6, s7, median(col[k, 8]), median(col[k, 9]),
          lo(col[k, 10]), median(col[k, 11]), median(col[k, 12]), hi(col[k, 13]),
          median(col[k, 14]), median(col[k, 15]), median(col[k, 16]), cached[k],
          lo(col[k, 4]), hi(col[k, 4]), lo(col[k, 11]), hi(col[k, 11]), n,
          servfail[k], maxconn[k], rssend[k], probe[k] == "" ? "-" : probe[k], others[k] == "" ? "-" : others[k]
      }
    }' "$RUNS" >"$TSV"
}

log "results in $OUT; ${DURATION}s per run; contender on CPU $SERVER_CPU, dnsperf/upstream/simulator on CPU $CLIENT_CPU"
HALF_RATE=${BENCH_HALF_RATE:-}
LARGE_RUNS="large-5000-udp512 large-3-udp512 large-5000-edns1232 large-3-edns1232"
SCENARIOS=$(for sc in $SCENARIOS; do [[ $sc == large-service ]] && echo "$LARGE_RUNS" || echo "$sc"; done)
for sc in $SCENARIOS; do
  if [[ $sc == hits-half-rate ]]; then
    if [[ -z $HALF_RATE ]]; then
      aggregate
      HALF_RATE=$(awk -F'\t' '$1 == "fwd-hits" && $2 == "ours-http" {printf "%d", $3 / 2}' "$TSV")
    fi
    if [[ -z $HALF_RATE || $HALF_RATE == 0 ]]; then
      log "skipping hits-half-rate: no ours-http fwd-hits run and no BENCH_HALF_RATE"
      continue
    fi
    log "hits-half-rate at $HALF_RATE queries/s"
  fi
  for ((round = 1; round <= ROUNDS; round++)); do
    for ct in $CONTENDERS; do
      [[ $ct == limit-sized && -z $(sized_records "$sc") ]] && continue
      [[ $sc == cold-start && $ct != ours-* && $ct != base-* ]] && continue
      [[ $ct == ours-file && ($sc == many-services || $sc == cold-start) ]] && continue
      log "$sc / $ct (round $round of $ROUNDS)"
      run_one "$sc" "$ct" "$round"
    done
  done
done
aggregate

# ---------------------------------------------------------------- report
limit_cpu() { # "scenario cpu ..." of the limit contender (median CPU µs per answer)
  awk -F'\t' '$2 == "limit" {printf "%s %s ", $1, $10}' "$TSV"
}
report() {
  echo "### Results"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(uname -srm), $CPUS CPUs ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)),"
  echo "dnsperf $(dnsperf -h 2>&1 | awk '/^Version/{print $2}'), $(dnsmasq --version | head -1 | awk '{print $1, $2, $3}'), unbound $(unbound -V 2>/dev/null | awk '/^Version/{print $2}'),"
  echo "consul-dns-forwarder $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') (release)${BASE_BIN:+; base-*: $BASE_BIN}."
  echo "${DURATION} s per run (fill-100k: until 100,000 names are sent), dnsperf -c $CLIENTS -q $OUTSTANDING -t 2;"
  echo "contender on CPU $SERVER_CPU, dnsperf + upstream + simulator on CPU $CLIENT_CPU; $SERVICES services x $INSTANCES instances."
  echo
  echo "Medians over $ROUNDS rounds (contenders interleaved within each round); min–max in brackets;"
  echo "lost: summed over the rounds; peak RSS: the highest; Consul requests: per run."
  echo
  echo "| scenario | contender | queries/s | lost | avg ms | p99 ms | NOERROR % | server CPU µs/answer | CPU / limit | helpers CPU µs/answer | peak RSS MiB | Consul HTTP req | Consul DNS req | Consul req per M queries |"
  echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
  awk -F'\t' -v limits="$(limit_cpu)" '
    BEGIN { n = split(limits, l, " "); for (i = 1; i < n; i += 2) lim[l[i]] = l[i + 1] }
    NR > 1 {
      x = ($1 in lim && lim[$1] + 0 > 0) ? sprintf("x%.2f", $10 / lim[$1]) : "-"
      printf "| %s | %s | %s (%s–%s) | %s | %s | %s | %s | %s (%s–%s) | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $17, $18, $6, $7, $8, $9, $10, $19, $20, x, $11, $12, $13, $14, $15
    }' "$TSV"
  if grep -qE $'^fill-100k\t(ours|base)-' "$TSV"; then
    echo
    awk -F'\t' '$1 == "fill-100k" && $2 ~ /^(ours|base)-/ {printf "fill-100k, %s: %s entries in the cache after the run (consul_dns_forwarder_cache_entries).\n", $2, $16}' "$TSV"
  fi
  report_base
  grep -qE $'^(consul|fwd-hits|mix-10pct-miss|hits-half-rate|fill-100k)\t' "$TSV" || {
    report8
    targets17
    return
  }
  echo
  echo "### Ratios (ours / peer; for queries/s higher is better, for the rest lower is better)"
  echo
  echo "| scenario | ours | peer | queries/s | CPU µs/answer | p99 | peak RSS |"
  echo "|---|---|---|--:|--:|--:|--:|"
  awk -F'\t' '
    NR > 1 {k = $1 SUBSEP $2; qps[k] = $3; cpu[k] = $10; p99[k] = $8; rss[k] = $12; seen[$1] = 1; ct[$2] = 1}
    function r(a, b) { return (b + 0 > 0 && a != "nan" && b != "nan") ? sprintf("%.2f", a / b) : "-" }
    END {
      n = split("consul fwd-hits mix-10pct-miss hits-half-rate fill-100k", order, " ")
      for (i = 1; i <= n; i++) {
        s = order[i]; if (!(s in seen)) continue
        split("ours-http ours-dns ours-file", ours, " "); split("dnsmasq unbound limit", peers, " ")
        for (o = 1; o <= 3; o++) for (p = 1; p <= 3; p++) {
          a = s SUBSEP ours[o]; b = s SUBSEP peers[p]
          if (!(a in qps) || !(b in qps)) continue
          printf "| %s | %s | %s | %s | %s | %s | %s |\n", s, ours[o], peers[p], r(qps[a], qps[b]), r(cpu[a], cpu[b]), r(p99[a], p99[b]), r(rss[a], rss[b])
        }
      }
    }' "$TSV"
  echo
  echo "### Targets (issue 6)"
  echo
  awk -F'\t' -v services="$SERVICES" '
    NR > 1 {k = $1 SUBSEP $2; qps[k] = $3; cpu[k] = $10; p99[k] = $8; rss[k] = $12; http[k] = $13; dns[k] = $14; secs[k] = $3 > 0 && $21 > 0 ? $5 / $21 / $3 : 0}
    function has(s, c) { return (s SUBSEP c) in qps }
    function verdict(ok) { return ok ? "met" : "NOT met" }
    # Requests made on timers over a run of t seconds, whatever is asked (src/consul): the
    # agent probe every 2 s (agent::PROBE_INTERVAL), the prepared-query list every 10 s
    # (inventory::QUERIES_REFRESH) and the datacenter list every 30 s (DATACENTERS_REFRESH),
    # one more each for a timer that fires at both ends of the run.
    function timed(t) { return int(t / 2) + 1 + int(t / 10) + 1 + int(t / 30) + 1 }
    END {
      o = "consul" SUBSEP "ours-http"; d = "consul" SUBSEP "dnsmasq"; u = "consul" SUBSEP "unbound"
      if (has("consul", "ours-http") && has("consul", "unbound"))
        printf "- Consul names, CPU/answer <= unbound: %.2f us vs %.2f us (x%.2f): %s\n", cpu[o], cpu[u], cpu[o] / cpu[u], verdict(cpu[o] <= cpu[u])
      if (has("consul", "ours-http") && has("consul", "dnsmasq"))
        printf "- Consul names, CPU/answer <= 0.8 x dnsmasq: %.2f us vs %.2f us (x%.2f): %s\n", cpu[o], cpu[d], cpu[o] / cpu[d], verdict(cpu[o] <= 0.8 * cpu[d])
      if (has("consul", "ours-http") && has("consul", "dnsmasq") && has("consul", "unbound"))
        printf "- Consul names, queries/s >= both: %d vs dnsmasq %d (x%.2f), unbound %d (x%.2f): %s\n", qps[o], qps[d], qps[o] / qps[d], qps[u], qps[o] / qps[u], verdict(qps[o] >= qps[d] && qps[o] >= qps[u])
      o = "fwd-hits" SUBSEP "ours-http"; u = "fwd-hits" SUBSEP "unbound"
      if (has("fwd-hits", "ours-http") && has("fwd-hits", "unbound"))
        printf "- Forwarded cache hits, CPU/answer <= unbound: %.2f us vs %.2f us (x%.2f): %s\n", cpu[o], cpu[u], cpu[o] / cpu[u], verdict(cpu[o] <= cpu[u])
      # Per service: its first fetch and one blocking query; per run at most 10 more: the two
      # datacenter-wide health feeds and the two catalog lists (a first request and a blocking
      # one each), `/v1/agent/self` and the datacenter list at start; and the requests of the timers
      # (timed() above), which grow with the length of the run, not with the query count.
      split("consul fwd-hits mix-10pct-miss hits-half-rate fill-100k", all, " ")
      worst = -1
      for (i in all) { k = all[i] SUBSEP "ours-http"; if (k in qps && http[k] + dns[k] - timed(secs[k]) > worst) { worst = http[k] + dns[k] - timed(secs[k]); ws = all[i]; wk = k } }
      if (worst >= 0)
        printf "- Requests reaching Consul bounded by services (%d services): at most %d requests in one run of ours-http (%s, %.0f s), whatever the query count, of which the timers may make %d: %s\n", services, http[wk] + dns[wk], ws, secs[wk], timed(secs[wk]), verdict(worst <= 2 * services + 10)
      k = "fill-100k" SUBSEP "ours-http"
      if (k in qps)
        printf "- Memory, peak RSS <= 32 MiB with 100,000 cached names: %.1f MiB: %s\n", rss[k], verdict(rss[k] <= 32)
      o = "hits-half-rate" SUBSEP "ours-http"; u = "hits-half-rate" SUBSEP "unbound"
      if ((o in qps) && (u in qps))
        printf "- p99 on cache hits at half our max throughput <= unbound: %.3f ms vs %.3f ms: %s\n", p99[o], p99[u], verdict(p99[o] <= p99[u])
    }' "$TSV"
  report8
  targets17
}

# Issue 17's targets, as ratios within this run: CPU per answer over the limit's in the same
# scenario (robust to the machine's speed), cache misses and p99 against dnsmasq.
#
# Each ratio is taken within a round (a contender over its peer, run one after the other in the
# same round and scenario) and the verdict is on the median of those per-round ratios, with
# their min–max beside it. The ratio of the table's medians ("of medians") is printed too: it
# divides figures from different rounds when the machine's speed moves between them, which is
# how three rounds once read x1.70 where the rounds themselves read 1.18, 1.86 and 1.18.
targets17() {
  echo
  echo "### Targets (issue 17)"
  echo
  echo "Each figure: the median over the rounds of the ratio within a round (min–max); \"of medians\": the"
  echo "ratio of the table's medians."
  echo
  awk -F'\t' '
    FNR == 1 { file++; next }
    file == 1 { k = $1 SUBSEP $2; cpu[k] = $10; p99[k] = $8; has[k] = 1; next }
    { v[$2, $3, $1] = $11; q[$2, $3, $1] = $9; if ($1 > rounds) rounds = $1 }
    function median(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    # Per-round ratios of column c (v: CPU, q: p99) of s/o over s/p; sets lo, hi; "" if none.
    function paired(s, o, p, c,   r, n, a, x, y) {
      n = 0; lo = hi = ""
      for (r = 1; r <= rounds; r++) {
        if (!((s, o, r) in v) || !((s, p, r) in v)) continue
        x = c == "q" ? q[s, o, r] : v[s, o, r]; y = c == "q" ? q[s, p, r] : v[s, p, r]
        if (y + 0 <= 0) continue
        a[++n] = x / y
        if (lo == "" || x / y < lo) lo = x / y
        if (hi == "" || x / y > hi) hi = x / y
      }
      return n ? median(a, n) : ""
    }
    function fig(m) { return sprintf("x%.2f (%.2f–%.2f)", m, lo, hi) }
    # The ratio of the medians in the table (CPU), printed beside the per-round figure.
    function of(s, o, p) { return ((s SUBSEP o) in has && (s SUBSEP p) in has && cpu[s, p] > 0) ? sprintf("x%.2f", cpu[s, o] / cpu[s, p]) : "-" }
    function verdict(ok) { return ok ? "met" : "NOT met" }
    END {
      n = split("http dns file", modes, " ")
      for (m = 1; m <= n; m++) {
        o = "ours-" modes[m]
        c = paired("consul", o, "limit", "v"); cf = c == "" ? "" : fig(c)
        f = paired("fwd-hits", o, "limit", "v"); ff = f == "" ? "" : fig(f)
        if (c != "" && f != "")
          printf "- %s: Consul names <= forwarded cache hits <= 1.3x the limit (CPU/answer over the limit): %s, %s (of medians %s, %s): %s\n", o, cf, ff, of("consul", o, "limit"), of("fwd-hits", o, "limit"), verdict(c <= f && f <= 1.3)
        split("large-3-udp512 large-5000-udp512 large-3-edns1232 large-5000-edns1232", large, " ")
        for (i = 1; i <= 4; i++) {
          l = paired(large[i], o, "limit", "v"); if (l == "") continue
          bound = f != "" ? f : 1.3
          printf "- %s: %s %s the limit (of medians %s) <= %s x%.2f: %s\n", o, large[i], fig(l), of(large[i], o, "limit"), f != "" ? "forwarded hits" : "", bound, verdict(l <= bound && bound <= 1.3)
        }
        # The same with the reply size taken out: over a canned reply of as many records.
        if (f == "") continue
        line = ""; ok = 1
        split("consul large-3-udp512 large-5000-udp512 large-3-edns1232 large-5000-edns1232", sized, " ")
        for (i = 1; i <= 5; i++) {
          l = paired(sized[i], o, "limit-sized", "v"); if (l == "") continue
          line = line sprintf("%s%s %s", line == "" ? "" : ", ", sized[i], fig(l)); ok = ok && l <= f
        }
        if (line != "")
          printf "- %s, each reply over limit-sized (the limit answering with as many records): %s <= forwarded hits x%.2f: %s\n", o, line, f, verdict(ok)
      }
      k = "fill-100k"
      x = paired(k, "ours-http", "dnsmasq", "v")
      if (x != "")
        printf "- Cache misses (fill-100k), CPU/answer <= dnsmasq: ours-http over dnsmasq %s (medians %.2f vs %.2f us): %s\n", fig(x), cpu[k, "ours-http"], cpu[k, "dnsmasq"], verdict(x <= 1)
      k = "mix-10pct-miss"
      x = paired(k, "ours-http", "dnsmasq", "q")
      if (x != "")
        printf "- p99 in mix-10pct-miss <= dnsmasq: ours-http over dnsmasq %s (medians %.3f vs %.3f ms): %s\n", fig(x), p99[k, "ours-http"], p99[k, "dnsmasq"], verdict(x <= 1)
    }' "$TSV" "$RUNS"
}

# ours / base-* per scenario, when BENCH_BASELINE_BIN's contenders ran: the ratio of the table's
# figures (medians; peak RSS: the highest), and in brackets the lowest and highest of the
# per-round ratios (a round runs both in turn).
report_base() {
  grep -qE $'^[^\t]+\tbase-' "$TSV" || return 0
  echo
  echo "### Against the baseline binary (ours / base; for queries/s higher is better, for the rest lower is better)"
  echo
  echo "| scenario | mode | queries/s | CPU µs/answer | p99 | peak RSS |"
  echo "|---|---|--:|--:|--:|--:|"
  awk -F'\t' '
    function r(a, b) { return (b + 0 > 0 && a != "nan" && b != "nan") ? a / b : "" }
    function f(x) { return x == "" ? "-" : sprintf("%.3f", x) }
    function span(s, m, c,   lo, hi, i, x) {
      lo = hi = ""
      for (i = 1; i <= rounds; i++) {
        if (!((s, "ours-" m, i) in v) || !((s, "base-" m, i) in v)) continue
        x = r(v[s, "ours-" m, i, c], v[s, "base-" m, i, c]); if (x == "") continue
        if (lo == "" || x < lo) lo = x
        if (hi == "" || x > hi) hi = x
      }
      return lo == "" ? "" : sprintf(" (%.3f–%.3f)", lo, hi)
    }
    function cell(s, m, c, mc) { return f(r(med[s, "ours-" m, mc], med[s, "base-" m, mc])) span(s, m, c) }
    FNR == 1 { file++; next }
    # results.tsv: medians. runs.tsv: one row per round (columns shifted by the round).
    file == 1 { med[$1, $2, 3] = $3; med[$1, $2, 8] = $8; med[$1, $2, 10] = $10; med[$1, $2, 12] = $12; if (!($1 in seen)) { seen[$1] = 1; order[++ns] = $1 } }
    file == 2 { v[$2, $3, $1] = 1; v[$2, $3, $1, 4] = $4; v[$2, $3, $1, 9] = $9; v[$2, $3, $1, 11] = $11; v[$2, $3, $1, 13] = $13; if ($1 > rounds) rounds = $1 }
    END {
      for (i = 1; i <= ns; i++) for (m = 1; m <= 2; m++) {
        s = order[i]; mode = m == 1 ? "http" : "dns"
        if (!((s, "ours-" mode, 3) in med) || !((s, "base-" mode, 3) in med)) continue
        printf "| %s | %s | %s | %s | %s | %s |\n", s, mode, cell(s, mode, 4, 3), cell(s, mode, 11, 10), cell(s, mode, 9, 8), cell(s, mode, 13, 12)
      }
    }' "$TSV" "$RUNS"
}

# The issue 8 sections, when their scenarios ran.
report8() {
  if grep -q $'^large-' "$TSV"; then
    echo
    echo "### Large services (issue 8)"
    echo
    echo "big.service.consul: $LARGE_INSTANCES instances, small.service.consul: $SMALL_INSTANCES; A over UDP. \"probe\": what one dig"
    echo "got before the run (rcode, TC, answer records, reply bytes). The simulator's DNS port (what dnsmasq"
    echo "and unbound ask) has udp_answer_limit $CONSUL_UDP_ANSWER_LIMIT, Consul's default."
    echo
    echo "| contender | client limit | instances | queries/s | lost | NOERROR % | other rcodes (last round) | server CPU µs/answer | CPU / limit | helpers CPU µs/answer | probe |"
    echo "|---|---|--:|--:|--:|--:|---|--:|--:|--:|---|"
    awk -F'\t' -v limits="$(limit_cpu)" '
      BEGIN { n = split(limits, l, " "); for (i = 1; i < n; i += 2) lim[l[i]] = l[i + 1] }
      NR > 1 && $1 ~ /^large-/ {
        split($1, p, "-"); size = p[3] == "udp512" ? "512 (no EDNS)" : "EDNS 1232"
        x = ($1 in lim && lim[$1] + 0 > 0) ? sprintf("x%.2f", $10 / lim[$1]) : "-"
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, size, p[2], $3, $6, $9, $26, $10, x, $11, $25
      }' "$TSV" | sort -t'|' -k2,2 -k3,3r -k4,4nr
    echo
    echo "Cost of an answer from the $LARGE_INSTANCES-instance service over the $SMALL_INSTANCES-instance one (server CPU µs per answer; target for ours <= 2x):"
    echo
    awk -F'\t' -v big="$LARGE_INSTANCES" -v small="$SMALL_INSTANCES" '
      NR > 1 && $1 ~ /^large-/ {split($1, p, "-"); cpu[$2, p[2], p[3]] = $10; done[$2, p[2], p[3]] = $5; ct[$2] = 1}
      END {
        n = split("limit limit-sized ours-http ours-dns ours-file base-http base-dns dnsmasq unbound", order, " ")
        for (i = 1; i <= n; i++) {
          c = order[i]; if (!(c in ct)) continue
          for (l = 1; l <= 2; l++) {
            lim = l == 1 ? "udp512" : "edns1232"
            if (!((c, big, lim) in cpu) || !((c, small, lim) in cpu)) continue
            b = cpu[c, big, lim]; s = cpu[c, small, lim]
            # A few hundred answers (a contender waiting on the simulator) make no CPU figure.
            if (done[c, big, lim] + 0 < 1000 || s + 0 == 0) { printf "- %s, %s: %d answers from the big service in the run: no figure\n", c, lim, done[c, big, lim]; continue }
            r = b / s
            verdict = c == "ours-http" ? (r <= 2 ? ": met" : ": NOT met") : ""
            printf "- %s, %s: %.2f / %.2f µs = x%.2f%s\n", c, lim, b, s, r, verdict
          }
        }
      }' "$TSV"
  fi
  if grep -q $'^many-services' "$TSV"; then
    echo
    echo "### Many services (issue 8)"
    echo
    echo "$MANY_SERVICES services x $MANY_INSTANCES instances, every name asked round robin (A, no EDNS) from a fresh start,"
    echo "$MANY_PASSES passes over the names (dnsperf -n $MANY_PASSES; the first pass starts the watchers);"
    echo "Consul HTTP req / DNS req: what reached the simulator in the run; peak connections: the most HTTP"
    echo "connections open at once on the simulator; RSS at end: VmRSS when dnsperf finished; service fetches:"
    echo "/v1/health/service requests, one per name and then a refresh per name asked after its TTL without a"
    echo "blocking query (a longer run makes more, and costs more CPU per answer)."
    echo
    echo "| contender | queries/s | answered | lost | SERVFAIL | server CPU µs/answer | Consul HTTP req | Consul DNS req | peak connections to Consul | peak RSS MiB | RSS at end MiB | watchers | service fetches |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"
    awk -F'\t' 'NR > 1 && $1 == "many-services" {
        w = $25; f = "-"
        if (match(w, /service-fetches=[0-9]+/)) f = substr(w, RSTART + 16, RLENGTH - 16)
        sub(/^watchers=/, "", w); sub(/ service-fetches=.*/, "", w)
        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $5, $6, $22, $10, $13, $14, $23, $12, $24, w, f
      }' "$TSV"
    echo
    awk -F'\t' -v services="$MANY_SERVICES" '$1 == "many-services" && $2 == "ours-http" {
        printf "- Memory, %d watched services of 10 instances in <= 64 MiB RSS: peak %.1f MiB, %.1f MiB at the end: %s\n", services, $12, $24, $12 <= 64 ? "met" : "NOT met"
      }' "$TSV"
  fi
  if grep -q $'^cold-start' "$TSV"; then
    echo
    echo "### Cold start (issue 8)"
    echo
    echo "The $MANY_SERVICES names of many-services asked once each from a fresh start (dnsperf -n 1),"
    echo "$COLD_START_OUTSTANDING in flight at a time; a query unanswered after $COLD_START_BOUND s counts as lost (dnsperf -t $COLD_START_BOUND)."
    echo "Time to answer every name: the run's length (answered / queries per second), per round; CPU s: the"
    echo "contender's CPU time over the run, and the helpers' (the simulator and the upstream, beside dnsperf), per round."
    echo
    echo "| contender | every name answered in s | server CPU s | helpers CPU s | answered | lost | SERVFAIL | peak connections to Consul | Consul HTTP req | Consul DNS req |"
    echo "|---|---|---|---|--:|--:|--:|--:|--:|--:|"
    # runs.tsv: round, scenario, contender, qps, sent, completed, lost, ..., CPU µs per answer
    # (11), helpers' (12), http (14), dns (15), servfail (18), peak connections (19).
    awk -F'\t' -v bound="$COLD_START_BOUND" -v budget="$CONSUL_MAX_CONNECTIONS" '
      NR > 1 && $2 == "cold-start" {
        c = $3; if (!(c in seen)) { seen[c] = 1; order[++n] = c }
        secs = $4 > 0 ? $6 / $4 : 0
        times[c] = times[c] (times[c] == "" ? "" : ", ") sprintf("%.2f", secs)
        cpu[c] = cpu[c] (cpu[c] == "" ? "" : ", ") sprintf("%.2f", $11 * $6 / 1e6)
        helpers[c] = helpers[c] (helpers[c] == "" ? "" : ", ") sprintf("%.2f", $12 * $6 / 1e6)
        if (secs > worst[c] + 0) worst[c] = secs
        sent[c] += $5; done[c] += $6; lost[c] += $7; servfail[c] += $18
        if ($19 + 0 > conn[c] + 0) conn[c] = $19
        http[c] = $14; dns[c] = $15
      }
      END {
        for (i = 1; i <= n; i++) { c = order[i]; printf "| %s | %s | %s | %s | %d | %d | %d | %d | %d | %d |\n", c, times[c], cpu[c], helpers[c], done[c], lost[c], servfail[c], conn[c], http[c], dns[c] }
        print ""
        for (i = 1; i <= n; i++) {
          c = order[i]; if (c !~ /^ours-/) continue
          ok = worst[c] <= bound && lost[c] == 0 && done[c] == sent[c] && servfail[c] == 0 && conn[c] <= budget
          printf "- %s, cold start: every name answered within %d s (slowest round %.2f s), %d lost, %d SERVFAIL, at most %d connections to Consul (budget %d): %s\n", c, bound, worst[c], lost[c], servfail[c], conn[c], budget, ok ? "met" : "NOT met"
        }
      }' "$RUNS"
  fi
}
report | tee "$OUT/results.md"

# ---------------------------------------------------------------- optional profiles
# perf with DWARF unwinding (.eh_frame: the release build has no frame pointers, and its symbol
# table but no debug info, so inlined functions count in their callers), so that time is
# attributed to the functions of the hot path, callees included. Written per scenario:
#   perf-<scenario>.txt: inclusive share of the hot path's main frames, then the flat top list.
# The profiled runs are extra runs: they are not part of the table (perf slows the server down).
if [[ $PERF == 1 ]]; then
  if ! command -v perf >/dev/null 2>&1; then
    log "BENCH_PERF=1 but perf is not installed (Debian: linux-perf); no profiles"
  else
    frames='TrackedFuture<F> as core::future::future::Future>::poll$|udp_loop::\{\{closure\}\}$|UdpLoop::run::\{\{closure\}\}$|UdpLoop::answer$|Handler::handle::\{\{closure\}\}$|ConsulSource::answer_inner|Backend>::service::|records::service_answer|records::select|name::parse$|Forwarder::answer|Cache::lookup$|BaseCache<K,V,S>::get_with_hash$|CachedAnswer::to_answer$|Cache::fetch|CachedAnswer::from_message|encode_reply$|Message::to_vec$|Message as hickory_proto::serialize::binary::BinDecodable>::read$|with_label_values$|Histogram.*observe|tokio::task::spawn::spawn$|__libc_sendto$|__libc_recvfrom$|__libc_sendmsg|__libc_recvmsg|__socket$|__connect$|__bind$|__close$|socket$|connect$|bind$|close$|__libc_send$|__libc_recv$|exchange_udp|ServerGroup::query|moka.*insert'
    for sc in $PERF_SCENARIOS; do
      scenario_load "$sc"
      log "perf profile: $sc / $PERF_CONTENDER"
      start_contender "$PERF_CONTENDER"
      timeout $((DURATION + 30)) perf record -F 400 --call-graph dwarf,16384 -p "$CPID" \
        -o "$W/perf-$sc.data" -- sleep "$DURATION" >/dev/null 2>"$W/perf.err" &
      perf_pid=$!
      PIDS+=("$perf_pid")
      timeout $((DURATION + 120)) taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$PORT" -d "$file" \
        -l "$DURATION" -c "$CLIENTS" -q "$OUTSTANDING" -t 2 "${args[@]}" >"$OUT/perf-$sc-dnsperf.txt" 2>&1 || true
      wait "$perf_pid" 2>/dev/null || true
      forget "$perf_pid"
      stop_pid "$CPID"
      {
        echo "# $PERF_CONTENDER, scenario $sc: share of the server's CPU samples in each frame, callees included"
        perf report -i "$W/perf-$sc.data" --children --stdio -g none --sort symbol --percent-limit 0.3 2>/dev/null |
          grep -v '^#' | sed -e 's/  */ /g' -e 's/ - - *$//' | grep -v '(inlined)' | grep -E "$frames" || true
        echo
        echo "# flat: self time per function"
        perf report -i "$W/perf-$sc.data" --no-children --stdio -g none --sort dso,symbol --percent-limit 0.8 2>/dev/null |
          grep -v '^#' | grep -v '^$' | sed -e 's/  */ /g' || true
      } >"$OUT/perf-$sc.txt"
      rm -f "$W/perf-$sc.data"
      log "wrote $OUT/perf-$sc.txt"
    done
  fi
fi
log "done: $OUT/results.md"
