#!/usr/bin/env bash
# Brings up a single-host Skiff dev cluster and applies the example job.
#   scripts/dev-cluster.sh        start (or reuse) the cluster and apply deploy/examples/web.toml
#   scripts/dev-cluster.sh down   stop it and remove its state
# State lives in .skiff-dev/ at the repository root. Only loopback addresses are used.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.skiff-dev"
rpc=127.0.0.1:7700
http=127.0.0.1:7780
bin="$root/target/debug"

down() {
  if [ -f "$state/controller.pid" ]; then
    kill "$(cat "$state/controller.pid")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$state/controller.pid")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$state"
  echo "dev cluster stopped and removed"
}

if [ "${1:-up}" = down ]; then down; exit 0; fi

command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
echo "building (cargo build --bins) ..."
(cd "$root" && cargo build --quiet --bins)
mkdir -p "$state"

if [ -f "$state/controller.pid" ] && kill -0 "$(cat "$state/controller.pid")" 2>/dev/null; then
  echo "controller already running (pid $(cat "$state/controller.pid"))"
else
  "$bin/skiff-controller" --id 1 --data-dir "$state/controller-1" \
    --rpc-addr "$rpc" --http-addr "$http" --bootstrap >"$state/controller.log" 2>&1 &
  echo $! >"$state/controller.pid"
  echo "controller started (pid $!, log $state/controller.log)"
fi

for _ in $(seq 100); do
  if curl -fsS "http://$http/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -fsS "http://$http/readyz" || { echo "controller did not become ready; see $state/controller.log" >&2; exit 1; }

"$bin/skiff" --controller "$rpc" apply -f "$root/deploy/examples/web.toml"
echo
"$bin/skiff" --controller "$rpc" jobs
cat <<TXT

Skiff dev cluster is up: controller gRPC $rpc, HTTP http://$http
  $bin/skiff job status web           # versions and allocations of the example job
  $bin/skiff cluster members          # the control plane
  curl http://$http/metrics           # Prometheus metrics
  scripts/dev-cluster.sh down         # stop and clean up
(The node agent that runs the job's containers comes with the agent issues; until then the
job is recorded and versioned by the controller.)
TXT
