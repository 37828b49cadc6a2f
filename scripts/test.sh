#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, builds the
# workspace once (the end-to-end tests drive those same binaries), and runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# prometheus: the e2e tests scrape the controllers with a real Prometheus and lint with promtool.
# busybox-static: the runtime tests build their container image from it.
# docker-registry, skopeo, apache2-utils (htpasswd), zstd, util-linux (script): the image tests
# run a real registry on loopback, push to it with skopeo and write archives with it.
# iproute2: the fleet tests build hosts from network namespaces.
# iptables: the agents masquerade pod egress. tcpdump: the overlay test captures the underlay.
# wireguard-tools (wg), wireguard-go: the overlay test checks peers with `wg show` and talks to
# a wireguard-go peer.
# bind9-dnsutils (dig), python3: the DNS tests query each host's DNS and send it garbage.
# openssl: the security test checks the controller's and agent's TLS with s_client.
# chromium, libnss3-tools (certutil, pk12util), tesseract-ocr: the observability test opens the
# status page in headless chromium with a reader's certificate and reads its screenshot back.
# lxc, debootstrap: scripts/systemd-e2e.sh installs Skiff with deploy/systemd on a Debian
# system container booted under systemd.
# libfaketime: the chaos test steps one host's wall clock forward and back.
# make: the controller's allocator (jemalloc, tikv-jemalloc-sys) is built with configure and make.
need_pkgs=(make libfaketime lxc debootstrap curl prometheus busybox-static docker-registry skopeo apache2-utils zstd util-linux iproute2
  iptables tcpdump wireguard-tools wireguard-go bind9-dnsutils python3 openssl chromium
  libnss3-tools tesseract-ocr)
missing=()
for p in "${need_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== the previous release's controller and agent (e2e/tests/compat.rs runs them with these)"
# Built first: it shares target/, and the build below puts the tree's binaries back.
if SKIFF_COMPAT_BIN_DIR=$(scripts/compat-build.sh); then
  export SKIFF_COMPAT_BIN_DIR
  echo "$SKIFF_COMPAT_BIN_DIR"
else
  # The other tests run; e2e/tests/compat.rs then fails, naming what it needs.
  echo "scripts/compat-build.sh FAILED: the compatibility test will fail" >&2
fi
echo "== cargo build (binaries used by the e2e tests)"
cargo build --workspace --bins --quiet
echo "== cargo test"
# A test whose prerequisite (root, a tool, a kernel feature) is missing fails and names it.
# SKIFF_TEST_SKIP=root,tools,NAME,... opts out explicitly (never in CI); what was skipped that
# way is listed at the end.
log="${TMPDIR:-/tmp}/skiff-test-$$.log"
export SKIFF_TEST_SKIP_LOG="${TMPDIR:-/tmp}/skiff-test-$$.skipped"
rm -f "$SKIFF_TEST_SKIP_LOG"
# A failing test must not end the script here (set -e with pipefail): the summary, the
# removal of the log and the systemd test still follow, and the status is returned at the end.
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(grep -E '^test result:' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | awk '{s+=$6} END {print s+0}')
skipped=0
[ -f "$SKIFF_TEST_SKIP_LOG" ] && skipped=$(sort -u "$SKIFF_TEST_SKIP_LOG" | wc -l)
rm -f "$log"
echo "$passed passed, $failed failed, $skipped skipped (SKIFF_TEST_SKIP=${SKIFF_TEST_SKIP:-})"
if [ "$skipped" -gt 0 ]; then
  sort -u "$SKIFF_TEST_SKIP_LOG" | sed 's/^/  skipped: /'
fi
rm -f "$SKIFF_TEST_SKIP_LOG"
echo "== install, upgrade and uninstall under systemd (scripts/systemd-e2e.sh)"
sysd=0
scripts/systemd-e2e.sh --bin-dir target/debug || sysd=$?
[ "$sysd" = 0 ] || echo "scripts/systemd-e2e.sh FAILED (exit $sysd)"
[ "$status" = 0 ] || exit "$status"
exit "$sysd"
