#!/usr/bin/env bash
# Installs everything lbd, its tests, lab and benchmarks need on a Debian machine, as root:
# system packages with apt-get, Python packages into ./.venv. Safe to run again.
# This is the developer setup (`make setup`); it disables keepalived, nginx, haproxy and
# prometheus. To install lbd on a production box use scripts/install.sh (`make install`).
# Last, it compiles the hot-path modules with mypyc into ./lbd-native (`make native`; gcc and
# python3-dev are for that: lb/native.py says when they are used).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(python3 python3-venv python3-pip iproute2 iputils-ping procps ethtool make
      keepalived nftables socat nginx-light iperf3 haproxy wrk tshark prometheus openssl gcc python3-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The distribution starts these services on install; tests run their own instances in namespaces.
for svc in keepalived nginx haproxy prometheus; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
.venv/bin/python scripts/build_native.py --if-stale
