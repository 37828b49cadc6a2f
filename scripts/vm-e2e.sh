#!/usr/bin/env bash
# Brings up a Vagrant fleet of Debian 12 VMs (deploy/vagrant/Vagrantfile) with the binaries
# built here, runs the fleet scenarios on it over ssh, and destroys it.
#
#   scripts/vm-e2e.sh [--provider libvirt|lxc] [--nodes N] [--bin-dir DIR] [--keep]
#
# lxc: the nodes are privileged system containers (vagrant-lxc) on this host's kernel, on a
# bridge this script makes (skNNNN-br, 198.18.22.0/24, no NAT): seconds to boot, and they run
# what this host's kernel has (here: the userspace WireGuard backend, cgroup v1 hierarchies).
# The box is built offline when missing (deploy/vagrant/build-box.sh, about 1.5 minutes) and
# kept in Vagrant's box store as skiff/debian-12. The VMs run under QEMU's TCG when there is
# no KVM (this machine): about 2 minutes to boot 3. Each run names its VMs and networks
# skNNNN-, keeps every network isolated (198.18.20.0/24 for the cluster, 198.18.21.0/24 for
# Vagrant; no NAT), and destroys them on success and on failure unless --keep.
#
# The scenarios (each prints its time):
#   - vagrant up: 3 controllers (node-1..3) and N agents, joined with tokens over mutual TLS;
#   then the shared fleet scenarios (e2e/src/scenario.rs, run by skiff-vm-scenarios over ssh;
#   the netns fleet runs the same code in e2e/tests/scenarios.rs):
#   - every member a voter; every node ready with the kernel WireGuard backend;
#   - the hosts run pure cgroup v2, and a container's memory limit is its cgroup's memory.max;
#   - a replica on node-1 reaches one on another node through the overlay (wg handshakes);
#   - install.sh upgrade on every node, one at a time, with a write after each and every
#     container running on (the netns fleet upgrades its daemons the same way);
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
    *) echo "usage: $0 [--provider libvirt|lxc] [--nodes N] [--bin-dir DIR] [--keep]" >&2; exit 2 ;;
  esac
done
case $provider in
  libvirt) net=198.18.20 ;;
  lxc) net=198.18.22 ;;
  *) echo "vm-e2e: --provider libvirt or lxc" >&2; exit 2 ;;
esac
[[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "vm-e2e: --nodes N" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "vm-e2e: needs root (libvirt, the box's loop device)" >&2; exit 1; }

started=$(date +%s%N)
step() {
  local t=$((($(date +%s%N) - started) / 100000000))
  printf '[%4d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*"
}
fail() { echo "vm-e2e: FAILED: $*" >&2; exit 1; }

missing=()
if [ "$provider" = libvirt ]; then
  pkgs=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 debootstrap parted)
else
  pkgs=(vagrant vagrant-lxc lxc debootstrap)
fi
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq
  # qemu-system-x86 of bookworm breaks a newer qemu-utils (a backport): take bookworm's.
  extra=()
  [ "$provider" = libvirt ] && extra=(qemu-utils/bookworm)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
    "${missing[@]}" "${extra[@]}" >/dev/null
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
  # Containers vagrant-lxc left, and this run's bridge.
  for c in $(lxc-ls -1 2>/dev/null | grep "^$run-" || true); do
    lxc-stop -k -n "$c" >/dev/null 2>&1 || true
    lxc-destroy -n "$c" >/dev/null 2>&1 || true
  done
  ip link del "$run-br" 2>/dev/null || true
  if [ "$we_started_libvirtd" = 1 ]; then
    pkill -x libvirtd || true
    pkill -x virtlogd || true
  fi
  rm -rf "$dir"
  exit $rc
}
trap cleanup EXIT

if [ "$provider" = libvirt ] && ! virsh -c qemu:///system version >/dev/null 2>&1; then
  step "starting libvirtd"
  mkdir -p /run/libvirt
  virtlogd -d
  libvirtd -d
  we_started_libvirtd=1
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null 2>&1 || fail "libvirtd did not start"
fi

if [ "$provider" = lxc ]; then
  box=/var/cache/skiff-test/debian-12-skiff-lxc.box
  ip link add "$run-br" type bridge
  ip addr add "$net.1/24" dev "$run-br"
  ip link set "$run-br" up
  export SKIFF_LXC_BRIDGE=$run-br
else
  box=/var/cache/skiff-test/debian-12-skiff.box
fi
if ! vagrant box list 2>/dev/null | grep -q "^skiff/debian-12 *($provider"; then
  if [ ! -f "$box" ]; then
    step "building the box (deploy/vagrant/build-box.sh --provider $provider)"
    "$root/deploy/vagrant/build-box.sh" --provider "$provider" "$box"
  fi
  vagrant box add --force --name skiff/debian-12 --provider "$provider" "$box" >/dev/null
fi

if [ -z "$bin_dir" ]; then
  step "building release binaries"
  (cd "$root" && cargo build --quiet --release --bins)
  bin_dir=$root/target/release
fi
# Without debug information: a quarter of the size to copy into every VM.
for b in skiff skiff-agent skiff-controller skiff-proxy skiff-monitor; do
  [ -x "$bin_dir/$b" ] || { [ $b = skiff-proxy ] || [ $b = skiff-monitor ] && continue; fail "$bin_dir/$b is missing"; }
  objcopy --strip-debug "$bin_dir/$b" "$dir/bin/$b"
done
sh "$root/runtime/tests/fixtures/make-busybox-image.sh" "$dir/images/web" >/dev/null

mkdir -p "$VAGRANT_CWD"
cp "$root/deploy/vagrant/Vagrantfile" "$VAGRANT_CWD/"
export NODES=$nodes SKIFF_BIN_DIR=$dir/bin SKIFF_DEPLOY_DIR=$root/deploy/systemd \
  SKIFF_IMAGES=$dir/images SKIFF_VM_PREFIX=$run- MEMORY=${MEMORY:-1024} CPUS=${CPUS:-1} \
  SKIFF_VM_NET=$net VAGRANT_DEFAULT_PROVIDER=$provider

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

# The shared fleet scenarios (e2e/src/scenario.rs, the same code as the netns fleet's
# e2e/tests/scenarios.rs) over ssh: members and nodes on the kernel WireGuard backend, the web
# job, a container's memory.max under pure cgroup v2, a page across the overlay.
# What the nodes run on: a VM has its own kernel (Debian 12: the WireGuard module, pure
# cgroup v2); a system container has this host's.
backend=kernel cgroup=()
if [ "$provider" = lxc ]; then
  ip link add "$run-wgp" type wireguard 2>/dev/null && ip link del "$run-wgp" || backend=userspace
  [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || cgroup=(--cgroup-v1)
fi
scenarios=("$bin_dir/skiff-vm-scenarios" --key "$VAGRANT_CWD/.vagrant/machines/{node}/$provider/private_key"
  --backend "$backend" "${cgroup[@]}")
for i in $(seq "$nodes"); do scenarios+=(--node "node-$i=$net.$((10 + i))"); done
[ -x "$bin_dir/skiff-vm-scenarios" ] || fail "$bin_dir/skiff-vm-scenarios is missing (cargo build --release --bins)"
if ! "${scenarios[@]}" basics 2>&1 | while IFS= read -r line; do step "$line"; done; then
  fail "the shared scenarios"
fi

# Rolling upgrade (the shared scenario): install.sh upgrade on one node at a time, a write
# after each, every container running on through it.
if ! "${scenarios[@]}" upgrade 2>&1 | while IFS= read -r line; do step "$line"; done; then
  fail "the rolling upgrade"
fi

if [ "$nodes" -ge 3 ]; then
  power_off="virsh destroy $run-{node} >/dev/null"
  [ "$provider" = lxc ] && power_off="lxc-stop -k -n $run-{node}"
  if ! "${scenarios[@]}" node-loss --victim "node-$nodes" --power-off "$power_off" 2>&1 |
    while IFS= read -r line; do step "$line"; done; then
    fail "node loss"
  fi
fi
step "PASSED (vagrant up ${up_secs}s)"
