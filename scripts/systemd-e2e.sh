#!/usr/bin/env bash
# Installs Skiff with deploy/systemd/install.sh on a Debian host booted under real systemd (an
# LXC system container on this machine) and checks what the units promise:
#   - the controller (bootstrap) and the agent start, enable and report healthy;
#   - a 3-replica job runs, its containers' live state in /run/skiff-agent (none beside the
#     records), kept across the agent's restart;
#   - `install.sh upgrade` replaces the binaries and restarts both units: the job's containers
#     keep running with the same processes, are adopted by the new agent, and `skiff exec`
#     reaches one; the cluster takes writes after the controller's restart (scale to 4);
#   - kill -9 of the agent: systemd restarts it and the containers stay;
#   - `install.sh uninstall --purge` leaves no container process, unit or data behind.
#
#   scripts/systemd-e2e.sh [--bin-dir DIR] [--keep]
#
# --bin-dir: the binaries to install [default: target/release, built first]. --keep leaves the
# container running for a look (remove it with the command printed).
#
# Needs root, lxc and debootstrap (installed with apt-get when missing). The Debian root file
# system is made once with debootstrap from this machine's configured Debian source and kept
# in /var/cache/skiff-test (about 45 s, 270 MB). Every run names what it makes skNNNN-sysd
# (the container, its directory /tmp/skNNNN-sysd) and removes it on success and on failure.
# The container has no network device but loopback: nothing leaves this machine.
#
# Two things differ from a VM, and the script says so when it meets them: this host mounts the
# cpu and cpuacct cgroup hierarchies apart, which the container's systemd does not mount, so
# the script mounts them; and /var/lib/skiff is a directory of this host bound into the
# container, because the agent's overlayfs cannot sit on the container's overlayfs root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=""
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--bin-dir DIR] [--keep]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "systemd-e2e: needs root (LXC containers)" >&2; exit 1; }

started=$(date +%s%N)
step() {
  local t=$((($(date +%s%N) - started) / 100000000))
  printf '[%4d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*"
}
fail() { echo "systemd-e2e: FAILED: $*" >&2; exit 1; }

missing=()
command -v lxc-start >/dev/null || missing+=(lxc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "$bin_dir" ]; then
  step "building release binaries"
  (cd "$root" && cargo build --quiet --release --bins)
  bin_dir=$root/target/release
fi
for b in skiff skiff-agent skiff-controller; do
  [ -x "$bin_dir/$b" ] || fail "$bin_dir/$b is missing"
done

# The root file system, made once.
cache=/var/cache/skiff-test
rootfs=$cache/debian-bookworm
if [ ! -x "$rootfs/sbin/init" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || fail "no Debian source configured in /etc/apt"
  step "debootstrap of Debian bookworm (once, into $rootfs)"
  mkdir -p "$cache"
  rm -rf "$rootfs.tmp"
  debootstrap --variant=minbase \
    --include=systemd-sysv,dbus,iproute2,iptables,procps,kmod,ca-certificates \
    bookworm "$rootfs.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    fail "debootstrap (see $cache/debootstrap.log)"
  : >"$rootfs.tmp/etc/machine-id"
  mv "$rootfs.tmp" "$rootfs"
fi

run=sk$$-sysd
dir=/tmp/$run
name=$run
lxcpath=$dir/lxc
A=(lxc-attach -n "$name" -P "$lxcpath" --clear-env --
  env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  SKIFF_CREDENTIALS=/var/lib/skiff/controller/admin.creds)

cleanup() {
  local rc=$?
  if [ "$keep" = 1 ] && [ $rc = 0 ]; then
    echo "kept: lxc-attach -n $name -P $lxcpath; remove with: lxc-stop -k -n $name -P $lxcpath; rm -rf $dir"
    return
  fi
  if [ $rc != 0 ] && [ -d "$lxcpath" ]; then
    echo "--- journal of the Skiff units ---" >&2
    "${A[@]}" journalctl -u skiff-controller -u skiff-agent -n 60 --no-pager >&2 2>/dev/null || true
  fi
  lxc-stop -k -n "$name" -P "$lxcpath" >/dev/null 2>&1 || true
  # Whatever the container left mounted under the run directory, deepest first.
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$dir"
  exit $rc
}
trap cleanup EXIT

mkdir -p "$lxcpath/$name" "$dir/upper" "$dir/bin/new" "$dir/bin/images" "$dir/var-lib-skiff"
for b in skiff skiff-agent skiff-controller skiff-proxy skiff-monitor; do
  [ -x "$bin_dir/$b" ] && cp "$bin_dir/$b" "$dir/bin/"
done
cp "$root"/deploy/systemd/install.sh "$root"/deploy/systemd/*.service "$dir/bin/"
# The release "upgraded" to: the same build from another directory, so every binary file is
# replaced and every process of the old one runs from a file that is gone.
for f in skiff skiff-agent skiff-controller skiff-proxy skiff-monitor install.sh skiff-agent.service skiff-controller.service; do
  [ -e "$dir/bin/$f" ] && cp "$dir/bin/$f" "$dir/bin/new/"
done
sh "$root/runtime/tests/fixtures/make-busybox-image.sh" "$dir/bin/images/web" >/dev/null
sed 's|^image = .*|image = "oci:/opt/skiff/images/web"|' "$root/deploy/examples/web.toml" >"$dir/bin/web.toml"

cat >"$lxcpath/$name/config" <<EOF
lxc.uts.name = $name
lxc.rootfs.path = overlay:$rootfs:$dir/upper
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.cap.drop =
lxc.mount.auto = proc:rw sys:rw cgroup:rw
lxc.cgroup.devices.allow = a
lxc.autodev = 1
lxc.pty.max = 10
lxc.tty.max = 1
lxc.init.cmd = /sbin/init
lxc.environment = container=lxc
lxc.mount.entry = /dev/net/tun dev/net/tun none bind,create=file 0 0
lxc.mount.entry = $dir/bin opt/skiff none bind,ro,create=dir 0 0
lxc.mount.entry = $dir/var-lib-skiff var/lib/skiff none bind,create=dir 0 0
EOF

step "booting $name under systemd"
lxc-start -n "$name" -P "$lxcpath" -o "$dir/lxc.log" || fail "lxc-start (see $dir/lxc.log)"
state=""
for _ in $(seq 150); do
  state=$("${A[@]}" systemctl is-system-running 2>/dev/null || true)
  case $state in running | degraded) break ;; esac
  sleep 0.2
done
case $state in running | degraded) ;; *) fail "systemd did not come up in the container ($state)" ;; esac
step "systemd is $state"

"${A[@]}" sh -c '
  missing=""
  for c in cpu cpuacct; do
    grep -q " /sys/fs/cgroup/$c .* cgroup .*[,]$c\(,\|$\)" /proc/self/mountinfo || missing="$missing $c"
  done
  [ -z "$missing" ] && exit 0
  echo "note: this host mounts cgroup v1$missing apart, which the container systemd leaves unmounted: mounting them"
  mount -o remount,rw /sys/fs/cgroup
  for c in $missing; do
    [ -L /sys/fs/cgroup/$c ] && rm /sys/fs/cgroup/$c
    mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
  done
  mount -o remount,ro /sys/fs/cgroup'

step "install.sh controller --bootstrap"
"${A[@]}" /opt/skiff/install.sh controller --id 1 --rpc-addr 127.0.0.1:7700 --bootstrap \
  --bin-dir /opt/skiff >"$dir/install-controller.log" 2>&1 ||
  { cat "$dir/install-controller.log" >&2; fail "installing the controller"; }
skiff() { "${A[@]}" skiff --controller 127.0.0.1:7700 "$@"; }
token=$(skiff token create --role agent --ttl 10m --uses 1) || fail "no agent join token"

step "install.sh agent"
# The agent's data is on this host's disk: at the default threshold (90% used) an agent on a
# nearly full disk (a CI machine after its builds) places nothing. Say so, and let it report
# pressure only on a full disk, as the test fleet's agents do.
disk_args=()
used=$(df --output=pcent "$dir/var-lib-skiff" | tail -1 | tr -dc 0-9)
if [ "${used:-0}" -ge 90 ]; then
  echo "note: the disk holding $dir is ${used}% full; the agent is installed with --disk-pressure-threshold 100"
  disk_args=(--disk-pressure-threshold 100)
fi
"${A[@]}" /opt/skiff/install.sh agent --controller 127.0.0.1:7700 --token "$token" \
  --advertise-addr 127.0.0.1 --name node-1 --local-image-dir /opt/skiff/images \
  "${disk_args[@]}" --bin-dir /opt/skiff >"$dir/install-agent.log" 2>&1 ||
  { cat "$dir/install-agent.log" >&2; fail "installing the agent"; }
for u in skiff-controller skiff-agent; do
  [ "$("${A[@]}" systemctl is-enabled $u)" = enabled ] || fail "$u is not enabled"
done
[ "$("${A[@]}" stat -c %a /etc/skiff/agent.env)" = 600 ] || fail "agent.env (the join token) is not 0600"
[ "$("${A[@]}" stat -c %U /var/lib/skiff/controller)" = skiff ] || fail "the controller's data is not the skiff user's"
[ "$("${A[@]}" ps -o user= -p "$("${A[@]}" systemctl show -p MainPID --value skiff-controller)")" = skiff ] ||
  fail "the controller does not run as the skiff user"

# Waits until job web has $1 allocations running; prints their ids and pids.
running() {
  local want=$1 n=0
  for _ in $(seq 150); do
    n=$(skiff ps web -o json | grep -c '"status": "running"' || true)
    [ "$n" = "$want" ] && return 0
    sleep 0.2
  done
  skiff ps web >&2 || true
  fail "job web has $n allocations running, not $want"
}
# The processes of the job's containers, as the host of the containers sees them.
container_pids() {
  { "${A[@]}" skiff-agent --config /etc/skiff/agent.toml container ps -o json || true; } |
    { grep -o '"pid": *[0-9]*' || true; } | grep -o '[0-9]*$' | sort -n | tr '\n' ' '
}

step "skiff apply -f web.toml (3 replicas)"
skiff apply -f /opt/skiff/web.toml >/dev/null
running 3
before=$(container_pids)
[ -n "$before" ] || fail "no container process found"
agent_pid=$("${A[@]}" systemctl show -p MainPID --value skiff-agent)
ctl_pid=$("${A[@]}" systemctl show -p MainPID --value skiff-controller)
inode=$("${A[@]}" stat -c %i /usr/local/bin/skiff-agent)
step "running: container processes $before"
# Their live state is on the tmpfs /run (the unit's SKIFF_RUN_DIR and RuntimeDirectory), none
# of it beside their records in /var/lib/skiff. The files' inodes show they outlive the
# agent's restart (a new agent would not make them again while the monitors run on).
live_states() {
  { "${A[@]}" sh -c 'ls -i /run/skiff-agent/containers/ 2>/dev/null' || true; } | sort | tr -s ' \n' ' '
}
states=$(live_states)
[ "$(echo "$states" | grep -o '[0-9a-f]*\.json' | wc -l)" -ge 3 ] ||
  fail "live state files in /run/skiff-agent/containers: '$states'"
beside=$({ "${A[@]}" sh -c 'ls /var/lib/skiff/agent/containers/*/state.json 2>/dev/null' || true; })
[ -z "$beside" ] || fail "state beside the records in /var/lib/skiff/agent: $beside"
step "live state in /run/skiff-agent: $states"

step "install.sh upgrade (binaries replaced, controller and agent restarted)"
"${A[@]}" /opt/skiff/new/install.sh upgrade --bin-dir /opt/skiff/new >"$dir/upgrade.log" 2>&1 ||
  { cat "$dir/upgrade.log" >&2; fail "upgrade"; }
[ "$("${A[@]}" stat -c %i /usr/local/bin/skiff-agent)" != "$inode" ] || fail "the agent binary was not replaced"
[ "$("${A[@]}" systemctl show -p MainPID --value skiff-agent)" != "$agent_pid" ] || fail "the agent was not restarted"
[ "$("${A[@]}" systemctl show -p MainPID --value skiff-controller)" != "$ctl_pid" ] || fail "the controller was not restarted"
running 3
after=$(container_pids)
[ "$after" = "$before" ] || fail "containers were restarted by the upgrade: $before -> $after"
alloc=$(skiff ps web -o json | grep -o '"id": *"[^"]*"' | head -1 | sed 's/.*"\([^"]*\)"$/\1/')
out=$(skiff exec "$alloc" -- cat /www/index.html 2>&1) || fail "skiff exec after the upgrade: $out"
[ "$(live_states)" = "$states" ] || fail "the live state did not outlive the agent's restart: $states -> $(live_states)"
step "same container processes after the upgrade; skiff exec works"
skiff scale web 4 >/dev/null || fail "a write after the controller's restart"
running 4

step "kill -9 of the agent: systemd restarts it, the containers stay"
agent_pid=$("${A[@]}" systemctl show -p MainPID --value skiff-agent)
before=$(container_pids)
"${A[@]}" kill -9 "$agent_pid"
for _ in $(seq 100); do
  now=$("${A[@]}" systemctl show -p MainPID --value skiff-agent)
  [ "$now" != "$agent_pid" ] && [ "$now" != 0 ] && break
  sleep 0.1
done
[ "$now" != "$agent_pid" ] && [ "$now" != 0 ] || fail "systemd did not restart the killed agent"
running 4
[ "$(container_pids)" = "$before" ] || fail "containers changed across the agent's kill -9"

step "install.sh uninstall --purge"
"${A[@]}" /opt/skiff/install.sh uninstall --purge >"$dir/uninstall.log" 2>&1 ||
  { cat "$dir/uninstall.log" >&2; fail "uninstall"; }
for p in $before; do
  "${A[@]}" test ! -d "/proc/$p" || fail "container process $p outlived uninstall --purge"
done
"${A[@]}" test ! -e /etc/systemd/system/skiff-agent.service || fail "a unit file is left"
"${A[@]}" test ! -e /var/lib/skiff/agent || fail "/var/lib/skiff/agent is left"
"${A[@]}" test ! -e /run/skiff-agent || fail "/run/skiff-agent is left"
"${A[@]}" test ! -e /usr/local/bin/skiff-agent || fail "a binary is left"
step "PASSED"
