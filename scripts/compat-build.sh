#!/usr/bin/env bash
# Builds `skiff-controller` and `skiff-agent` as they were at the compatibility baseline (the
# previous release) and prints the directory that holds them. The contract says an agent one
# release older than the controllers keeps working and that controllers upgrade one member at
# a time; e2e/tests/compat.rs runs these binaries against the ones built from the tree.
#
# Usage: scripts/compat-build.sh [--rev REV]
# The baseline moves forward at each release: set BASELINE below to the release's commit.
# The build shares target/ (the dependencies compile once) and the binaries are kept under
# target/compat/REV/, so a second call costs nothing. It builds the tree's controller and
# agent again at the end, so that target/debug holds the tree's binaries, not the
# baseline's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The end of session 33, the last release before fencing: no `capabilities` in registration,
# no `[disconnect]` in job specs, command level 1.
BASELINE=3c9164e4ec84b74c54620fc0a1390940597741aa
rev=$BASELINE
while [ $# -gt 0 ]; do
  case "$1" in
    --rev) rev=${2:?--rev needs a commit}; shift 2 ;;
    *) echo "usage: $0 [--rev REV]" >&2; exit 2 ;;
  esac
done
cd "$root"
if ! git rev-parse --verify --quiet "$rev^{commit}" >/dev/null; then
  # A shallow clone (CI's may be): fetch just that commit, else the whole history.
  echo "compat-build: $rev is not in this clone; fetching it from origin" >&2
  git fetch -q --depth 1 origin "$rev" 2>/dev/null || git fetch -q --unshallow origin 2>/dev/null || true
fi
full=$(git rev-parse --verify --quiet "$rev^{commit}") || {
  echo "compat-build: commit $rev is not in this clone, and fetching it from origin failed" >&2
  exit 1
}
short=${full:0:12}
out="$root/target/compat/$short"
if [ -x "$out/skiff-controller" ] && [ -x "$out/skiff-agent" ]; then
  echo "$out"
  exit 0
fi
src="$root/target/compat/src-$short"
rm -rf "$src" "$out"
mkdir -p "$src"
git archive "$full" | tar -x -C "$src"
echo "compat-build: building skiff-controller and skiff-agent at $short" >&2
(cd "$src" && CARGO_TARGET_DIR="$root/target" cargo build --quiet \
  -p skiff-controller --bin skiff-controller -p skiff-agent --bin skiff-agent)
mkdir -p "$out.tmp"
cp "$root/target/debug/skiff-controller" "$root/target/debug/skiff-agent" "$out.tmp/"
mv "$out.tmp" "$out"
rm -rf "$src"
# Put the tree's own binaries back in target/debug (a relink when they are built already).
(cd "$root" && cargo build --quiet -p skiff-controller --bin skiff-controller -p skiff-agent --bin skiff-agent)
echo "$out"
