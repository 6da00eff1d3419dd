#!/usr/bin/env bash
# Server CPU per answer at one offered rate: Consul names against forwarded cache hits, from one
# running forwarder (issue 17, docs/benchmarks.md step eleven).
#
#   benches/rate_pair.sh                          # 100,000 queries/s, 5 rounds of 8 s each
#   RATE=50000 ROUNDS=8 benches/rate_pair.sh
#   BIN=/path/to/consul-dns-forwarder benches/rate_pair.sh
#   BASE_BIN=/path/to/older/consul-dns-forwarder benches/rate_pair.sh   # two builds, paired
#
# With BASE_BIN, a second forwarder (that build, the same config) runs beside the first, and
# each round asks both the same names at the same rate, one after the other (which goes first
# alternates by round): the table then gives, per round, ours over base for Consul names and for
# forwarded hits. At one offered rate the comparison is of the builds' own cost per answer, not
# of the rate dnsperf happened to reach against each (which benches/load.sh's paired rounds
# also measure).
#
# Why: benches/load.sh runs each scenario as fast as dnsperf goes, and below saturation the CPU
# per answer falls as the rate rises (more datagrams per wake-up and per system call). dnsperf
# reaches different rates against different answers, so "Consul names <= forwarded hits" there
# also measures dnsperf. Here both are asked at the same rate, alternating within each round,
# from the same process: the ratio per round is the answers' own.
#
# Placement as in load.sh: the forwarder on CPU 0; dnsperf, the simulator (20 services x 3
# instances, HTTP mode) and the upstream (unbound serving h0..h99.test) on CPU 1. Needs dnsperf
# and unbound (benches/load.sh installs them). Loopback only; everything started is stopped.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RATE=${RATE:-100000}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
PORT=${PORT:-25410}
UP_PORT=$((PORT + 1))
die() { echo "rate_pair: $*" >&2; exit 1; }
for tool in dnsperf unbound taskset; do
  command -v "$tool" >/dev/null || die "$tool not found (benches/load.sh installs dnsperf and unbound)"
done
if [[ -z ${BIN:-} ]]; then
  (cd "$ROOT" && timeout 1800 cargo build --release --quiet --bin consul-dns-forwarder --example bench_consul_sim)
  BIN=$TARGET_DIR/release/consul-dns-forwarder
fi
SIM_BIN=$TARGET_DIR/release/examples/bench_consul_sim
[[ -x $SIM_BIN ]] || (cd "$ROOT" && timeout 1800 cargo build --release --quiet --example bench_consul_sim)

W=$(mktemp -d)
# shellcheck source=benches/support/unbound.sh
source "$ROOT/benches/support/unbound.sh"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

{
  unbound_server "$UP_PORT"
  cat <<EOF
  module-config: "iterator"
  local-zone: "test." static
  local-data: "test. 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60"
EOF
  hit_names_data 100
} >"$W/upstream.conf"
taskset -c 1 unbound -d -c "$W/upstream.conf" >"$W/upstream.log" 2>&1 &
PIDS+=($!)
taskset -c 1 "$SIM_BIN" --services 20 --instances 3 --addr-file "$W/sim.addr" \
  --stats-file "$W/sim.stats" --max-seconds 3600 >"$W/sim.log" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 100; i++)); do [[ -s $W/sim.addr ]] && break; sleep 0.1; done
SIM_HTTP=$(sed -n 's/^http=//p' "$W/sim.addr")
[[ -n $SIM_HTTP ]] || die "simulator did not start: $(cat "$W/sim.log")"
declare -A SERVER_PID=() SERVER_PORT=()
start_forwarder() { # who binary port (DNS; metrics on port + 10)
  printf '[server]\nlisten = ["127.0.0.1:%s"]\n[upstream]\nservers = ["127.0.0.1:%s"]\n[metrics]\nlisten = "127.0.0.1:%s"\n' \
    "$3" "$UP_PORT" $(($3 + 10)) >"$W/$1.toml"
  taskset -c 0 "$2" --config "$W/$1.toml" --consul-http "$SIM_HTTP" >"$W/$1.log" 2>&1 &
  SERVER_PID[$1]=$!
  SERVER_PORT[$1]=$3
  PIDS+=("$!")
}
start_forwarder ours "$BIN" "$PORT"
[[ -n ${BASE_BIN:-} ]] && start_forwarder base "$BASE_BIN" $((PORT + 2))
for ((i = 0; i < 20; i++)); do printf 'svc%02d.service.consul A\n' "$i"; done >"$W/consul.txt"
for ((i = 0; i < 100; i++)); do echo "h$i.test A"; done >"$W/hits.txt"
sleep 1.5
for who in "${!SERVER_PID[@]}"; do
  kill -0 "${SERVER_PID[$who]}" 2>/dev/null || die "the $who forwarder exited: $(cat "$W/$who.log")"
  # Every name answered a few times first: views fetched, watchers started, hits cached.
  dnsperf -s 127.0.0.1 -p "${SERVER_PORT[$who]}" -d "$W/consul.txt" -n 3 >/dev/null 2>&1
  dnsperf -s 127.0.0.1 -p "${SERVER_PORT[$who]}" -d "$W/hits.txt" -n 2 >/dev/null 2>&1
done
sleep 1

HZ=$(getconf CLK_TCK)
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
# Server CPU µs per answer of one dnsperf run of `kind` names against `who`, at RATE.
cpu_per_answer() { # who kind
  local pid=${SERVER_PID[$1]} t0 t1 done_n
  t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  taskset -c 1 dnsperf -s 127.0.0.1 -p "${SERVER_PORT[$1]}" -d "$W/$2.txt" -l "$DURATION" -c 10 -q 100 \
    -Q "$RATE" >"$W/dnsperf.txt" 2>&1 || die "dnsperf failed: $(tail -3 "$W/dnsperf.txt")"
  t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  done_n=$(awk '/Queries completed/{print $3}' "$W/dnsperf.txt")
  [[ ${done_n:-0} -gt 0 ]] || die "no answers for $2 from $1"
  awk -v t=$((t1 - t0)) -v n="$done_n" -v hz="$HZ" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}'
}

if [[ -n ${BASE_BIN:-} ]]; then
  echo "| round | Consul names µs/answer, ours / base | ratio | forwarded hits µs/answer, ours / base | ratio |"
  echo "|--:|--:|--:|--:|--:|"
  consul_ratios=() hits_ratios=()
  for ((r = 1; r <= ROUNDS; r++)); do
    order=(ours base)
    ((r % 2)) || order=(base ours)
    declare -A cpu=()
    for kind in consul hits; do
      for who in "${order[@]}"; do cpu[$who,$kind]=$(cpu_per_answer "$who" "$kind"); done
    done
    c=$(awk -v a="${cpu[ours,consul]}" -v b="${cpu[base,consul]}" 'BEGIN {printf "%.3f", a / b}')
    h=$(awk -v a="${cpu[ours,hits]}" -v b="${cpu[base,hits]}" 'BEGIN {printf "%.3f", a / b}')
    consul_ratios+=("$c") hits_ratios+=("$h")
    echo "| $r | ${cpu[ours,consul]} / ${cpu[base,consul]} | $c | ${cpu[ours,hits]} / ${cpu[base,hits]} | $h |"
  done
  echo
  echo "Ours over base at $RATE queries/s, median of $ROUNDS rounds: Consul names x$(printf '%s\n' "${consul_ratios[@]}" | median), forwarded hits x$(printf '%s\n' "${hits_ratios[@]}" | median)"
  exit 0
fi

echo "| round | Consul names µs/answer | forwarded hits µs/answer | Consul / hits |"
echo "|--:|--:|--:|--:|"
ratios=()
for ((r = 1; r <= ROUNDS; r++)); do
  consul=$(cpu_per_answer ours consul)
  hits=$(cpu_per_answer ours hits)
  ratio=$(awk -v a="$consul" -v b="$hits" 'BEGIN {printf "%.3f", a / b}')
  ratios+=("$ratio")
  echo "| $r | $consul | $hits | $ratio |"
done
echo
echo "Consul names over forwarded hits at $RATE queries/s, median of $ROUNDS rounds: x$(printf '%s\n' "${ratios[@]}" | median)"
