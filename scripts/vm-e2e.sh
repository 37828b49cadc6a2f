#!/usr/bin/env bash
# Brings up a Vagrant fleet of Debian 12 VMs (deploy/vagrant/Vagrantfile) with the binaries
# built here, runs the fleet scenarios on it over ssh, and destroys it.
#
#   scripts/vm-e2e.sh [--provider libvirt] [--nodes N] [--bin-dir DIR] [--keep]
#
# The box is built offline when missing (deploy/vagrant/build-box.sh, about 1.5 minutes) and
# kept in Vagrant's box store as skiff/debian-12. The VMs run under QEMU's TCG when there is
# no KVM (this machine): about 2 minutes to boot 3. Each run names its VMs and networks
# skNNNN-, keeps every network isolated (198.18.20.0/24 for the cluster, 198.18.21.0/24 for
# Vagrant; no NAT), and destroys them on success and on failure unless --keep.
#
# The scenarios (each prints its time):
#   - vagrant up: 3 controllers (node-1..3) and N agents, joined with tokens over mutual TLS;
#   - every member a voter; every node ready with the kernel WireGuard backend;
#   - the hosts run pure cgroup v2, and a container's memory limit is its cgroup's memory.max;
#   - a replica on node-1 reaches one on another node through the overlay (wg handshakes);
#   - install.sh upgrade on every node, one at a time, with a write after each;
#   - a node powered off: its allocations are replaced on the others (time to replacement).
# Needs root. Installs vagrant, vagrant-libvirt, libvirt, qemu-system-x86 and debootstrap
# with apt-get when missing, and starts libvirtd (and stops it again) when it is not running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
provider=libvirt
nodes=3
bin_dir=""
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --provider) provider=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--provider libvirt] [--nodes N] [--bin-dir DIR] [--keep]" >&2; exit 2 ;;
  esac
done
[ "$provider" = libvirt ] ||
  { echo "vm-e2e: provider $provider: only libvirt is written so far (the lxc variant is not)" >&2; exit 2; }
[[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "vm-e2e: --nodes N" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "vm-e2e: needs root (libvirt, the box's loop device)" >&2; exit 1; }

started=$(date +%s%N)
step() {
  local t=$((($(date +%s%N) - started) / 100000000))
  printf '[%4d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*"
}
fail() { echo "vm-e2e: FAILED: $*" >&2; exit 1; }

missing=()
for p in vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 debootstrap parted; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq
  # qemu-system-x86 of bookworm breaks a newer qemu-utils (a backport): take bookworm's.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
    "${missing[@]}" qemu-utils/bookworm >/dev/null
fi

run=sk$$
dir=/tmp/$run-vm
mkdir -p "$dir/bin" "$dir/images" "$dir/vagrant"
export VAGRANT_CWD=$dir/vagrant
we_started_libvirtd=0

cleanup() {
  local rc=$?
  if [ "$keep" = 1 ]; then
    echo "kept: VAGRANT_CWD=$VAGRANT_CWD vagrant ssh node-1; remove with: VAGRANT_CWD=$VAGRANT_CWD vagrant destroy -f; rm -rf $dir"
    exit $rc
  fi
  if [ -f "$VAGRANT_CWD/Vagrantfile" ]; then
    (cd "$VAGRANT_CWD" && timeout 300 vagrant destroy -f >/dev/null 2>&1) || true
  fi
  # What vagrant could not destroy (a VM it saw as inaccessible): by this run's prefix.
  for d in $(virsh list --all --name 2>/dev/null | grep "^$run-" || true); do
    virsh destroy "$d" >/dev/null 2>&1 || true
    virsh undefine --remove-all-storage "$d" >/dev/null 2>&1 || true
  done
  # Networks vagrant-libvirt made for this run, if it left any.
  for n in $(virsh net-list --all --name 2>/dev/null | grep "^$run-" || true); do
    virsh net-destroy "$n" >/dev/null 2>&1 || true
    virsh net-undefine "$n" >/dev/null 2>&1 || true
  done
  if [ "$we_started_libvirtd" = 1 ]; then
    pkill -x libvirtd || true
    pkill -x virtlogd || true
  fi
  rm -rf "$dir"
  exit $rc
}
trap cleanup EXIT

if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  step "starting libvirtd"
  mkdir -p /run/libvirt
  virtlogd -d
  libvirtd -d
  we_started_libvirtd=1
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null 2>&1 || fail "libvirtd did not start"
fi

box=/var/cache/skiff-test/debian-12-skiff.box
if ! vagrant box list 2>/dev/null | grep -q '^skiff/debian-12 '; then
  if [ ! -f "$box" ]; then
    step "building the box (deploy/vagrant/build-box.sh)"
    "$root/deploy/vagrant/build-box.sh" "$box"
  fi
  vagrant box add --force --name skiff/debian-12 "$box" >/dev/null
fi

if [ -z "$bin_dir" ]; then
  step "building release binaries"
  (cd "$root" && cargo build --quiet --release --bins)
  bin_dir=$root/target/release
fi
# Without debug information: a quarter of the size to copy into every VM.
for b in skiff skiff-agent skiff-controller skiff-proxy; do
  [ -x "$bin_dir/$b" ] || { [ $b = skiff-proxy ] && continue; fail "$bin_dir/$b is missing"; }
  objcopy --strip-debug "$bin_dir/$b" "$dir/bin/$b"
done
sh "$root/runtime/tests/fixtures/make-busybox-image.sh" "$dir/images/web" >/dev/null

mkdir -p "$VAGRANT_CWD"
cp "$root/deploy/vagrant/Vagrantfile" "$VAGRANT_CWD/"
export NODES=$nodes SKIFF_BIN_DIR=$dir/bin SKIFF_DEPLOY_DIR=$root/deploy/systemd \
  SKIFF_IMAGES=$dir/images SKIFF_VM_PREFIX=$run- MEMORY=${MEMORY:-1024} CPUS=${CPUS:-1}

step "vagrant up: $nodes nodes (provider $provider)"
up_start=$(date +%s)
if ! (cd "$VAGRANT_CWD" && vagrant up --no-parallel --provider "$provider" >"$dir/up.log" 2>&1); then
  tail -40 "$dir/up.log" >&2
  for f in "$VAGRANT_CWD"/.vagrant/skiff/*.console.log; do
    [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }
  done
  fail "vagrant up"
fi
up_secs=$(($(date +%s) - up_start))
step "cluster up in ${up_secs}s"

# A command on node $1 as root, over ssh to its cluster address with the key Vagrant put in.
# (Not `vagrant ssh`: vagrant-libvirt finds a VM by its management DHCP lease, and a VM that
# keeps its address without renewing it shows as "inaccessible" for a while.)
on() {
  local n=$1
  shift
  ssh -q -i "$VAGRANT_CWD/.vagrant/machines/node-$n/libvirt/private_key" \
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 \
    "vagrant@198.18.20.$((10 + n))" "sudo env SKIFF_CREDENTIALS=/var/lib/skiff/controller/admin.creds $*"
}
ctl=198.18.20.11:7700
skiff() { on 1 skiff --controller "$ctl" "$@"; }
# Waits up to $1 seconds for the command after it to succeed.
until_ok() {
  local secs=$1 i
  shift
  for ((i = 0; i < secs; i++)); do
    "$@" && return 0
    sleep 1
  done
  return 1
}

controllers=$((nodes < 3 ? nodes : 3))
voters() { [ "$(skiff cluster members -o json | grep -c '"voter": true')" = "$controllers" ]; }
until_ok 60 voters || fail "not every controller is a voter: $(skiff cluster members)"
step "$controllers controller members, all voters"

nodes_json=$(skiff nodes -o json)
ready=$(grep -c '"status": "ready"' <<<"$nodes_json" || true)
[ "$ready" = "$nodes" ] || fail "$ready of $nodes nodes ready: $(skiff nodes)"
kernel=$(grep -c '"backend": "kernel"' <<<"$nodes_json" || true)
[ "$kernel" = "$nodes" ] || fail "$kernel of $nodes nodes on the kernel WireGuard backend: $nodes_json"
handshaken() {
  [ "$(skiff nodes -o json | grep -c "\"peers_handshaken\": $((nodes - 1))")" = "$nodes" ]
}
until_ok 60 handshaken || fail "not every node has a WireGuard handshake with every other: $(skiff nodes)"
step "$nodes nodes ready, every one on the kernel WireGuard backend, with a handshake with every other"

for i in $(seq "$nodes"); do
  fs=$(on "$i" stat -fc %T /sys/fs/cgroup)
  [ "$fs" = cgroup2fs ] || fail "node-$i: /sys/fs/cgroup is $fs, not cgroup2fs (pure cgroup v2)"
done
replicas=$((nodes * 2))
on 1 sh -c "'sed -e \"s|^image = .*|image = \\\"oci:/opt/skiff/images/web\\\"|\" -e \"s|^replicas = .*|replicas = $replicas|\" /dev/stdin >/root/web.toml'" \
  <"$root/deploy/examples/web.toml"
skiff apply -f /root/web.toml >/dev/null || fail "skiff apply"
running() { [ "$(skiff ps web -o json | grep -c '"status": "running"')" = "$1" ]; }
until_ok 180 running "$replicas" || fail "web: not $replicas running: $(skiff ps web)"
step "web: $replicas replicas running"

# A container's memory limit (64Mi in web.toml) through cgroup v2.
pid=$(on 2 skiff-agent --config /etc/skiff/agent.toml container ps -o json | grep -o '"pid": *[0-9]*' | head -1 | grep -o '[0-9]*$')
[ -n "$pid" ] || fail "node-2 runs no container"
cg=$(on 2 cat "/proc/$pid/cgroup" | tr -d '\r')
[[ $cg == 0::/* ]] || fail "node-2: container $pid is not in a cgroup v2 hierarchy: $cg"
max=$(on 2 cat "/sys/fs/cgroup${cg#0::}/memory.max" | tr -d '\r')
[ "$max" = 67108864 ] || fail "node-2: the container's memory.max is $max, not 67108864 (64Mi)"
step "node-2: a container's memory.max is 64Mi (cgroup v2: ${cg#0::})"

# Across hosts through the overlay.
ps_json=$(skiff ps web -o json)
from=$(python3 -c 'import json,sys; a=[x for x in json.load(sys.stdin) if x["node"]=="node-1"]; print(a[0]["id"])' <<<"$ps_json")
to_ip=$(python3 -c 'import json,sys; a=[x for x in json.load(sys.stdin) if x["node"]!="node-1"]; print(a[0]["ip"])' <<<"$ps_json")
# (No wget -T: busybox 1.35's wget segfaults with it here.)
out=$(skiff exec "$from" -- wget -qO- "http://$to_ip:8080/") || fail "node-1 to $to_ip across the overlay: $out"
[[ $out == *"hello from skiff"* ]] || fail "node-1 to $to_ip across the overlay: got \"$out\""
step "a replica on node-1 reached $to_ip on another node through the overlay"

# Rolling upgrade: one node at a time, a write after each.
for i in $(seq "$nodes"); do
  on "$i" /tmp/skiff/install.sh upgrade --bin-dir /tmp/skiff >"$dir/upgrade-$i.log" 2>&1 ||
    { cat "$dir/upgrade-$i.log" >&2; fail "upgrade of node-$i"; }
  printf 'name = "probe-%s"\nimage = "oci:/opt/skiff/images/web"\ncommand = ["/bin/sleep", "3600"]\n' "$i" |
    on 1 "tee /root/probe-$i.toml" >/dev/null
  until_ok 60 skiff apply -f "/root/probe-$i.toml" >/dev/null || fail "a write after upgrading node-$i"
done
jobs=$(skiff jobs -o json)
for i in $(seq "$nodes"); do
  grep -q "\"probe-$i\"" <<<"$jobs" || fail "job probe-$i, written after upgrading node-$i, is gone"
done
until_ok 120 running "$replicas" || fail "web after the upgrades: $(skiff ps web)"
step "every node upgraded in turn; writes went on; $replicas replicas running"

if [ "$nodes" -ge 3 ]; then
  victim=$nodes
  lost=$(python3 -c "import json,sys; print(sum(1 for x in json.load(sys.stdin) if x['node']=='node-$victim'))" <<<"$(skiff ps web -o json)")
  t0=$(date +%s%N)
  virsh destroy "$run-node-$victim" >/dev/null
  elsewhere() {
    python3 -c "import json,sys; a=json.load(sys.stdin); sys.exit(0 if sum(1 for x in a if x['status']=='running' and x['node']!='node-$victim')==$replicas else 1)" \
      <<<"$(skiff ps web -o json)"
  }
  until_ok 120 elsewhere || fail "node-$victim's allocations were not replaced: $(skiff ps web)"
  ms=$((($(date +%s%N) - t0) / 1000000))
  step "node-$victim powered off: its $lost allocations replaced and running elsewhere in ${ms} ms"
fi
step "PASSED (vagrant up ${up_secs}s)"
