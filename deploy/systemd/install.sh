#!/usr/bin/env bash
# Installs Skiff on a host under systemd, upgrades it, or removes it.
#
#   install.sh controller --id N --rpc-addr IP:PORT (--bootstrap | --join ADDR --token TOKEN)
#              [--http-addr IP:PORT] [--tls-san NAME]... [--bin-dir DIR] [--force]
#   install.sh agent --controller ADDR[,ADDR...] --token TOKEN [--advertise-addr IP]
#              [--name NAME] [--labels k=v,...] [--local-image-dir DIR]...
#              [--insecure-registry HOST:PORT]... [--disk-pressure-threshold PCT]
#              [--bin-dir DIR] [--force]
#   install.sh upgrade [--bin-dir DIR]
#   install.sh uninstall [--purge]
#
# controller/agent put the binaries in /usr/local/bin, the settings in /etc/skiff (a config
# file, and the join token in a root-only environment file), the units in
# /etc/systemd/system, then enable and start the unit and wait until it is healthy (the
# controller's /readyz, the agent's /healthz). Settings already there are kept unless --force:
# re-running the command is safe. The join token is only used on the first start.
#
# upgrade replaces the binaries (a rename, so running processes keep their old file) and
# restarts each Skiff unit of this host in turn, waiting until it is healthy again. The
# agent's containers keep running across its restart (KillMode=process) and are adopted by
# the new agent. Upgrade controllers one host at a time: the cluster keeps its quorum and
# its writes, and a command a not yet upgraded member could not read is held back until
# every member runs the new release (`skiff cluster members` shows each member's release).
#
# uninstall stops and removes the units and the binaries; --purge also removes the settings
# and the data (/var/lib/skiff), after removing the agent's containers and network.
#
# --bin-dir: where the new binaries are [default: this script's directory if it holds
# skiff-agent or skiff-controller, else target/release of the repository it is in].
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prefix=/usr/local/bin
etc=/etc/skiff
units=/etc/systemd/system

die() { echo "install.sh: $*" >&2; exit 1; }
# need "$@" in an option's branch: the option ($1) must have a value after it.
need() { [ $# -ge 2 ] || die "$1 needs a value"; }
say() { echo "==> $*"; }

[ "$(id -u)" = 0 ] || die "run as root"
[ -d /run/systemd/system ] || die "systemd is not running on this host (no /run/systemd/system)"
command -v systemctl >/dev/null || die "systemctl is missing"

default_bin_dir() {
  if [ -x "$here/skiff-agent" ] || [ -x "$here/skiff-controller" ]; then
    echo "$here"
  else
    echo "$here/../../target/release"
  fi
}

# Replaces $prefix/$1 with $bin_dir/$1 atomically. Fails if the new binary is missing, unless
# $2 is "optional".
put_bin() {
  local name=$1 src="$bin_dir/$1"
  if [ ! -x "$src" ]; then
    [ "${2:-}" = optional ] && return 0
    die "$src is missing (build with: cargo build --release --bins, or give --bin-dir)"
  fi
  install -m 0755 "$src" "$prefix/.$name.new"
  mv -f "$prefix/.$name.new" "$prefix/$name"
  local version
  version=$("$prefix/$name" --version 2>/dev/null || true)
  echo "    $prefix/$name${version:+ ($version)}"
}

# The per-container monitor binary goes with the agent it came with: a bundle without one
# removes an older one (the agent then runs its built-in monitor), so the two never differ.
# Monitors already running keep the file they started from.
put_monitor() {
  if [ -x "$bin_dir/skiff-monitor" ]; then
    put_bin skiff-monitor
  else
    rm -f "$prefix/skiff-monitor"
  fi
}

put_unit() {
  install -m 0644 "$here/$1" "$units/$1"
}

# Writes $2 to file $1 with mode $3 unless the file exists (and --force was not given).
put_config() {
  local path=$1 text=$2 mode=$3
  if [ -e "$path" ] && [ "$force" != 1 ]; then
    echo "    $path kept (exists; --force replaces it)"
    return 0
  fi
  install -d -m 0755 "$etc"
  (umask 077 && printf '%s' "$text" >"$path.new")
  chmod "$mode" "$path.new"
  mv -f "$path.new" "$path"
  echo "    $path written"
}

# GET http://$1$2 with bash's /dev/tcp (no curl on a minimal host); succeeds on a 200.
http_ok() {
  local host=${1%:*} port=${1##*:} path=$2 line
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$1" >&3
  IFS= read -r -t 5 line <&3 || { exec 3>&-; return 1; }
  exec 3>&-
  [[ $line == *" 200 "* ]]
}

# Waits up to $3 seconds for unit $1 to be active and http://$2 to answer 200.
wait_healthy() {
  local unit=$1 url=$2 secs=$3 i
  for ((i = 0; i < secs * 5; i++)); do
    if systemctl is-active --quiet "$unit" && http_ok "${url%%/*}" "/${url#*/}"; then
      echo "    $unit is healthy (http://$url)"
      return 0
    fi
    sleep 0.2
  done
  systemctl status --no-pager "$unit" >&2 || true
  journalctl -u "$unit" -n 30 --no-pager >&2 || true
  die "$unit did not become healthy within ${secs}s (http://$url)"
}

# A value of the installed config file: the string after `key = ` (first match).
config_value() {
  sed -n "s/^$2 *= *\"\\{0,1\\}\\([^\"]*\\)\"\\{0,1\\} *$/\\1/p" "$1" | head -1
}

controller_url() {
  local http
  http=$(config_value "$etc/controller.toml" http_addr)
  echo "${http:-127.0.0.1:7780}/readyz"
}

agent_url() {
  local listen adv
  listen=$(config_value "$etc/agent.toml" metrics_listen)
  adv=$(config_value "$etc/agent.toml" advertise_addr)
  echo "${listen:-${adv:-127.0.0.1}:7802}/healthz"
}

# start_unit controller|agent TOKEN URL: the join token (if any) in the root-only env file,
# the unit installed, enabled and started, then healthy at URL.
start_unit() {
  local role=$1 token=$2 url=$3
  if [ -n "$token" ]; then
    put_config "$etc/$role.env" "SKIFF_JOIN_TOKEN=$token
" 0600
  fi
  say "unit"
  put_unit "skiff-$role.service"
  systemctl daemon-reload
  systemctl enable --now "skiff-$role.service"
  wait_healthy "skiff-$role.service" "$url" 120
}

toml_list() { # toml_list a b c -> ["a", "b", "c"]
  local out="" x
  for x in "$@"; do out+="${out:+, }\"$x\""; done
  echo "[$out]"
}

install_controller() {
  local id="" rpc="" http="" bootstrap=0 join="" token="" sans=()
  while [ $# -gt 0 ]; do
    case $1 in
      --id) need "$@"; id=$2; shift 2 ;;
      --rpc-addr) need "$@"; rpc=$2; shift 2 ;;
      --http-addr) need "$@"; http=$2; shift 2 ;;
      --bootstrap) bootstrap=1; shift ;;
      --join) need "$@"; join=$2; shift 2 ;;
      --token) need "$@"; token=$2; shift 2 ;;
      --tls-san) need "$@"; sans+=("$2"); shift 2 ;;
      --bin-dir) need "$@"; bin_dir=$2; shift 2 ;;
      --force) force=1; shift ;;
      *) die "controller: unknown argument $1" ;;
    esac
  done
  [[ $id =~ ^[1-9][0-9]*$ ]] || die "controller: --id N (a positive integer) is required"
  [ -n "$rpc" ] || die "controller: --rpc-addr IP:PORT is required (the address the other members and the agents reach)"
  http=${http:-${rpc%:*}:7780}
  if [ "$bootstrap" = 1 ]; then
    [ -z "$join" ] || die "controller: --bootstrap and --join exclude each other"
  else
    [ -n "$join" ] && [ -n "$token" ] || die "controller: --bootstrap, or --join ADDR with --token TOKEN"
  fi
  say "binaries from $bin_dir"
  put_bin skiff-controller
  put_bin skiff optional
  getent group skiff >/dev/null || groupadd --system skiff
  getent passwd skiff >/dev/null ||
    useradd --system --gid skiff --home-dir /var/lib/skiff/controller --no-create-home \
      --shell /usr/sbin/nologin skiff
  say "settings in $etc"
  local formation
  if [ "$bootstrap" = 1 ]; then formation="bootstrap = true"; else formation="join = \"$join\""; fi
  put_config "$etc/controller.toml" "# skiff-controller settings (see skiff-controller --help).
# bootstrap/join only matter on the first start; afterwards the data directory rules.
id = $id
data_dir = \"/var/lib/skiff/controller\"
rpc_addr = \"$rpc\"
http_addr = \"$http\"
$formation
tls_sans = $(toml_list "${sans[@]}")
" 0644
  start_unit controller "$token" "$(controller_url)"
  if [ "$bootstrap" = 1 ]; then
    cat <<TXT
The cluster's first member is up. Its admin credentials are
/var/lib/skiff/controller/admin.creds: keep a copy somewhere safe, and on this host use
  export SKIFF_CREDENTIALS=/var/lib/skiff/controller/admin.creds
  skiff --controller $rpc token create --role controller --ttl 1h --uses 2   # for 2 more members
  skiff --controller $rpc token create --role agent --ttl 1h --uses 10       # for agents
TXT
  fi
}

install_agent() {
  local controllers="" token="" adv="" name="" labels="" images=() registries=() disk="" disk_given=""
  while [ $# -gt 0 ]; do
    case $1 in
      --controller) need "$@"; controllers=$2; shift 2 ;;
      --token) need "$@"; token=$2; shift 2 ;;
      --advertise-addr) need "$@"; adv=$2; shift 2 ;;
      --name) need "$@"; name=$2; shift 2 ;;
      --labels) need "$@"; labels=$2; shift 2 ;;
      --local-image-dir) need "$@"; images+=("$2"); shift 2 ;;
      --insecure-registry) need "$@"; registries+=("$2"); shift 2 ;;
      --disk-pressure-threshold) need "$@"; disk=$2; disk_given=1; shift 2 ;;
      --bin-dir) need "$@"; bin_dir=$2; shift 2 ;;
      --force) force=1; shift ;;
      *) die "agent: unknown argument $1" ;;
    esac
  done
  [ -n "$controllers" ] || die "agent: --controller ADDR[,ADDR...] is required"
  [[ -z $disk_given || ($disk =~ ^[1-9][0-9]{1,2}$ && $disk -ge 50 && $disk -le 100) ]] ||
    die "agent: --disk-pressure-threshold must be a percentage between 50 and 100, not \"$disk\""
  [ -n "$token" ] || [ -e /var/lib/skiff/agent/tls ] ||
    die "agent: --token TOKEN is required for a first start (skiff token create --role agent)"
  say "binaries from $bin_dir"
  put_bin skiff-agent
  put_bin skiff-proxy optional
  put_monitor
  put_bin skiff optional
  say "settings in $etc"
  local IFS_=$IFS label_toml="" kv
  IFS=, read -r -a list <<<"$controllers"
  local ctl_toml
  ctl_toml=$(toml_list "${list[@]}")
  IFS=, read -r -a kvs <<<"$labels"
  IFS=$IFS_
  for kv in "${kvs[@]}"; do
    [[ $kv == *=* ]] || die "agent: --labels: \"$kv\" is not key=value"
    label_toml+="${label_toml:+, }${kv%%=*} = \"${kv#*=}\""
  done
  put_config "$etc/agent.toml" "# skiff-agent settings (see skiff-agent --help; each flag by its long name, - as _).
data_dir = \"/var/lib/skiff/agent\"
controllers = $ctl_toml
${name:+name = \"$name\"
}${adv:+advertise_addr = \"$adv\"
}labels = { $label_toml }
local_image_dirs = $(toml_list "${images[@]}")
insecure_registries = $(toml_list "${registries[@]}")
${disk:+disk_pressure_threshold = $disk
}" 0644
  start_unit agent "$token" "$(agent_url)"
}

upgrade() {
  while [ $# -gt 0 ]; do
    case $1 in
      --bin-dir) need "$@"; bin_dir=$2; shift 2 ;;
      *) die "upgrade: unknown argument $1" ;;
    esac
  done
  local any=0
  say "binaries from $bin_dir"
  put_bin skiff optional
  if [ -e "$units/skiff-controller.service" ]; then
    any=1
    put_bin skiff-controller
    put_unit skiff-controller.service
    systemctl daemon-reload
    say "restarting skiff-controller"
    systemctl restart skiff-controller.service
    wait_healthy skiff-controller.service "$(controller_url)" 120
  fi
  if [ -e "$units/skiff-agent.service" ]; then
    any=1
    put_bin skiff-agent
    put_bin skiff-proxy optional
    put_monitor
    put_unit skiff-agent.service
    systemctl daemon-reload
    say "restarting skiff-agent (its containers keep running)"
    systemctl restart skiff-agent.service
    wait_healthy skiff-agent.service "$(agent_url)" 120
  fi
  [ "$any" = 1 ] || die "upgrade: no Skiff unit is installed on this host"
}

uninstall() {
  local purge=0
  [ "${1:-}" = --purge ] && purge=1
  for u in skiff-agent skiff-controller; do
    if [ -e "$units/$u.service" ]; then
      systemctl disable --now "$u.service" || true
      rm -f "$units/$u.service"
    fi
  done
  systemctl daemon-reload
  if [ "$purge" = 1 ] && [ -x "$prefix/skiff-agent" ] && [ -d /var/lib/skiff/agent ]; then
    say "removing the agent's containers and network"
    SKIFF_CONFIG=$etc/agent.toml "$prefix/skiff-agent" container ps -a -o json 2>/dev/null |
      grep -o '"id": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/' |
      while read -r id; do
        SKIFF_CONFIG=$etc/agent.toml "$prefix/skiff-agent" container rm -f "$id" >/dev/null || true
      done
    SKIFF_CONFIG=$etc/agent.toml "$prefix/skiff-agent" network down || true
  fi
  rm -f "$prefix/skiff-controller" "$prefix/skiff-agent" "$prefix/skiff-proxy" "$prefix/skiff-monitor" "$prefix/skiff"
  if [ "$purge" = 1 ]; then
    # /var/lib/skiff may be a mount point of its own: empty it, then remove it if it can go.
    rm -rf "$etc" /var/lib/skiff/agent /var/lib/skiff/controller /run/skiff-agent
    rmdir /var/lib/skiff 2>/dev/null || true
    getent passwd skiff >/dev/null && userdel skiff
  fi
  if [ "$purge" = 1 ]; then say "Skiff removed, with its settings and data"; else say "Skiff removed (settings in $etc and data in /var/lib/skiff kept)"; fi
}

force=0
bin_dir=$(default_bin_dir)
cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  controller) install_controller "$@" ;;
  agent) install_agent "$@" ;;
  upgrade) upgrade "$@" ;;
  uninstall) uninstall "$@" ;;
  *) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
