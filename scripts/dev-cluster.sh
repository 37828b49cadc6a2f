#!/usr/bin/env bash
# Brings up a single-host Skiff dev cluster (one controller, one agent) and runs the example
# job on it: deploy/examples/web.toml with its image replaced by a busybox image this script
# builds (runtime/tests/fixtures/make-busybox-image.sh), so nothing is downloaded.
#   sudo scripts/dev-cluster.sh        start (or reuse) the cluster and deploy the example
#   sudo scripts/dev-cluster.sh down   stop it, remove its containers and state
# State lives in .skiff-dev/ at the repository root (SKIFF_DEV_DIR moves it; SKIFF_DEV_CGROUP
# names the containers' cgroup parent, default skiff-dev). Only loopback addresses are used. The agent
# runs containers, so this needs root. It also sets up the pod network on this host: a bridge
# skiff0 (10.42.0.1/24), a userspace WireGuard tunnel skiff-wg (no peers on one host), iptables
# masquerade for pod egress and net.ipv4.ip_forward=1; `down` removes all of it and puts
# ip_forward back as it was. Everything talks mutual TLS: the controller creates the cluster
# CA and writes admin credentials to $state/controller-1/admin.creds (the skiff commands
# below use them through SKIFF_CREDENTIALS); the agent enrolls with a join token.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="${SKIFF_DEV_DIR:-$root/.skiff-dev}"
rpc=127.0.0.1:7700
http=127.0.0.1:7780
agent_api=127.0.0.1:7801
bin="$root/target/debug"
cgroup_parent="${SKIFF_DEV_CGROUP:-skiff-dev}"

stop_pid() {
  if [ -f "$1" ]; then
    kill "$(cat "$1")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$1")" 2>/dev/null || break; sleep 0.1; done
  fi
}

down() {
  stop_pid "$state/agent.pid"
  if [ -d "$state/agent" ]; then
    "$bin/skiff-agent" --data-dir "$state/agent" --cgroup-parent "$cgroup_parent" container ps -a -o json 2>/dev/null |
      python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]' 2>/dev/null |
      while read -r id; do
        "$bin/skiff-agent" --data-dir "$state/agent" --cgroup-parent "$cgroup_parent" container rm -f "$id" >/dev/null 2>&1 || true
      done
  fi
  for d in /sys/fs/cgroup/*/"$cgroup_parent"; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
  if [ -d "$state/agent" ]; then
    "$bin/skiff-agent" --data-dir "$state/agent" network down || true
  fi
  if [ -f "$state/ip_forward.before" ]; then
    cat "$state/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
  fi
  stop_pid "$state/controller.pid"
  rm -rf "$state"
  echo "dev cluster stopped and removed"
}

if [ "${1:-up}" = down ]; then down; exit 0; fi

command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the agent runs containers: run this as root" >&2; exit 1; }
missing=()
for p in curl busybox-static python3 iptables; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
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
export SKIFF_CREDENTIALS="$state/controller-1/admin.creds"
for _ in $(seq 100); do [ -f "$SKIFF_CREDENTIALS" ] && break; sleep 0.1; done

[ -f "$state/ip_forward.before" ] || cat /proc/sys/net/ipv4/ip_forward >"$state/ip_forward.before"
if [ -f "$state/agent.pid" ] && kill -0 "$(cat "$state/agent.pid")" 2>/dev/null; then
  echo "agent already running (pid $(cat "$state/agent.pid"))"
else
  mkdir -p "$state/images"
  token=""
  for _ in $(seq 100); do
    token=$("$bin/skiff" --controller "$rpc" token create --role agent --ttl 10m --uses 1 2>/dev/null) && break
    sleep 0.1
  done
  [ -n "$token" ] || { echo "no join token; see $state/controller.log" >&2; exit 1; }
  # At the default threshold (90% used) an agent on a nearly full disk places nothing: say so,
  # and let the dev cluster's single node report pressure only on a full disk.
  disk_args=()
  used=$(df --output=pcent "$state" | tail -1 | tr -dc 0-9)
  if [ "${used:-0}" -ge 90 ]; then
    echo "note: the disk holding $state is ${used}% full; the agent runs with --disk-pressure-threshold 100" \
      "(at the default 90 it would refuse new work)" >&2
    disk_args=(--disk-pressure-threshold 100)
  fi
  SKIFF_JOIN_TOKEN="$token" "$bin/skiff-agent" --data-dir "$state/agent" --cgroup-parent "$cgroup_parent" \
    --controller "$rpc" --name dev-1 --advertise-addr 127.0.0.1 --listen "$agent_api" \
    --labels zone=a --local-image-dir "$state/images" "${disk_args[@]}" >"$state/agent.log" 2>&1 &
  echo $! >"$state/agent.pid"
  echo "agent started (pid $!, log $state/agent.log)"
fi
for _ in $(seq 100); do
  "$bin/skiff" --controller "$rpc" nodes 2>/dev/null | grep -q '^dev-1 .* ready' && break
  sleep 0.1
done

# The example service, from an image built here.
sh "$root/runtime/tests/fixtures/make-busybox-image.sh" "$state/images/web" >/dev/null
sed "s|^image = .*|image = \"oci:$state/images/web\"|" "$root/deploy/examples/web.toml" >"$state/web.toml"
"$bin/skiff" --controller "$rpc" apply -f "$state/web.toml"
for _ in $(seq 100); do
  [ "$("$bin/skiff" --controller "$rpc" ps web -o json | grep -c '"ip": "10\.')" -ge 3 ] && break
  sleep 0.2
done
echo
"$bin/skiff" --controller "$rpc" nodes
echo
"$bin/skiff" --controller "$rpc" ps web
alloc=$("$bin/skiff" --controller "$rpc" ps web -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
other_ip=$("$bin/skiff" --controller "$rpc" ps web -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["ip"])')
echo
echo "\$ skiff exec $alloc -- wget -qO- http://$other_ip:8080/    # another replica, by its pod IP"
"$bin/skiff" --controller "$rpc" exec "$alloc" -- wget -qO- "http://$other_ip:8080/"
cat <<TXT

Skiff dev cluster is up: controller gRPC $rpc (mutual TLS), HTTP http://$http, agent dev-1 ($agent_api)
  export SKIFF_CREDENTIALS=$SKIFF_CREDENTIALS
  $bin/skiff ps web                   # the example's allocations (3 busybox httpd replicas)
  $bin/skiff logs $alloc        # one replica's output
  $bin/skiff exec $alloc -- ps  # a command inside it
  $bin/skiff scale web 5              # more replicas; skiff plan -f FILE shows a change first
  $bin/skiff nodes                    # the node, its resources and labels
  curl http://$http/metrics           # Prometheus metrics
  sudo scripts/dev-cluster.sh down    # stop everything and clean up
TXT
