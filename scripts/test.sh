#!/usr/bin/env bash
# Runs every test. Installs what the tests need when it is missing, via apt-get when running as
# root: dig (bind9-dnsutils), promtool and prometheus (prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v dig >/dev/null 2>&1 || need_pkgs+=(bind9-dnsutils)
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing: ${need_pkgs[*]} — run as root or: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

cargo test --all-targets "$@"
