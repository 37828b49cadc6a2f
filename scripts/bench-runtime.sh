#!/usr/bin/env bash
# Container start-to-exit latency of `/bin/true` in the busybox fixture image: skiff-agent
# against runc and crun (Debian packages) on the same rootfs, in the same run, with hyperfine;
# then the resident memory of 20 running containers' monitors. Needs root.
#   scripts/bench-runtime.sh [--write-md BENCHMARKS.md] [--runs N]   (N runs per runtime per round, 3 rounds)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
md=""
runs=100
while [ $# -gt 0 ]; do
  case "$1" in
    --write-md) md=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
missing=()
for p in hyperfine runc crun busybox-static python3; do
  dpkg -s "$p" >/dev/null 2>&1 || command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release -q -p skiff-agent
cargo build --release -q -p skiff-e2e --bin skiff-bench-start
agent="$root/target/release/skiff-agent"
inproc="$root/target/release/skiff-bench-start"

work=$(mktemp -d /tmp/skiff-bench-rt.XXXXXX)
parent="skiff-bench-rt-$$"
data="$work/agent"
# Each runtime's live state on a tmpfs, as /run is on a systemd host (skiff-agent's
# --run-dir, runc's and crun's --root); records and writable layers stay on the disk.
if [ "$(stat -f -c %T /run)" = tmpfs ]; then tmpfs=/run; else tmpfs=/dev/shm; fi
run=$(mktemp -d "$tmpfs/skiff-bench-rt.XXXXXX")
cleanup() {
  for c in $(runc --root "$run/runc" list -q 2>/dev/null); do runc --root "$run/runc" delete -f "$c" >/dev/null 2>&1 || true; done
  for c in $(crun --root "$run/crun" list -q 2>/dev/null); do crun --root "$run/crun" delete -f "$c" >/dev/null 2>&1 || true; done
  "$agent" --data-dir "$data" --cgroup-parent "$parent" container ps -a -o json 2>/dev/null |
    python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]' 2>/dev/null |
    while read -r id; do "$agent" --data-dir "$data" --cgroup-parent "$parent" container rm -f "$id" >/dev/null 2>&1 || true; done
  for d in /sys/fs/cgroup/*/"$parent"; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
  rm -rf "$work" "$run"
}
trap cleanup EXIT

bash runtime/tests/fixtures/make-busybox-image.sh "$work/image" >/dev/null
image="oci:$work/image:latest"
A=("$agent" --data-dir "$data" --cgroup-parent "$parent" --run-dir "$run/skiff")
"${A[@]}" image pull "$image" >/dev/null

# The same rootfs for runc and crun: the image's layers, unpacked in order.
bundle="$work/bundle"
mkdir -p "$bundle/rootfs"
python3 - "$work/image" "$bundle/rootfs" <<'PY'
import json, sys, tarfile, os
layout, dest = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
index = json.load(open(os.path.join(layout, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
for layer in manifest["layers"]:
    with tarfile.open(blob(layer["digest"])) as t:
        t.extractall(dest, filter="fully_trusted")
PY
(cd "$bundle" && runc spec)
# The same seccomp filter skiff-agent installs (runc spec has none), so runc and crun do the
# same filtering work.
"$inproc" --print-oci-seccomp >"$work/seccomp.json"
python3 - "$bundle/config.json" "$work/seccomp.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/true"]
c["root"]["readonly"] = False
c["linux"]["seccomp"] = json.load(open(sys.argv[2]))
json.dump(c, open(p, "w"), indent=1)
PY

# crun refuses this hybrid cgroup host unless /sys/fs/cgroup/unified is out of sight. Its
# environment is set up once, not per run: its hyperfine itself runs in a mount namespace of
# its own with that unmounted, so no wrapper process is inside the timed command. Where the
# host has no cgroup2 mounted there, it runs like the others.
crun_hyperfine=(hyperfine)
if [ -d /sys/fs/cgroup/unified ]; then
  crun_hyperfine=(unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec hyperfine "$@"' hyperfine)
fi

# Three rounds, interleaved (each round: skiff-agent, skiff in-process, crun, then runc and the
# floor), so a slow moment of the machine does not land on one runtime only; the report gives
# the median of the rounds' medians and their range. Each block starts after the kernel's
# deferred work from the last one (network namespaces torn down in kworkers, RCU callbacks)
# has had a second to drain, so it is not charged to the next runtime.
settle() { sync; sleep 1; }
rounds=3
for r in $(seq "$rounds"); do
  echo "round $r/$rounds"
  settle
  hyperfine --warmup 10 --runs "$runs" --export-json "$work/round$r-a.json" \
    -n skiff-agent "${A[*]} container run --rm --image $image -- /bin/true" >"$work/round$r-a.txt"
  settle
  # The runtime as the agent daemon calls it: one process, no command line started per run.
  "$inproc" --data-dir "$data" --cgroup-parent "$parent" --run-dir "$run/skiff" --image "$image" \
    --warmup 10 --runs "$runs" -- /bin/true >"$work/round$r-c.json"
  settle
  "${crun_hyperfine[@]}" --warmup 10 --runs "$runs" --export-json "$work/round$r-b.json" \
    -n crun "crun --root $run/crun run --bundle $bundle c\$\$" >"$work/round$r-b.txt"
  settle
  hyperfine --warmup 10 --runs "$runs" --export-json "$work/round$r-d.json" \
    -n runc "runc --root $run/runc run --bundle $bundle r\$\$" \
    -n 'fork+exec /bin/true (floor)' "/bin/true" >"$work/round$r-d.txt"
  cat "$work/round$r-a.txt" "$work/round$r-b.txt" "$work/round$r-d.txt"
done

# Memory: 20 containers running; the monitors' resident memory (the agent's per-container
# processes).
ids=()
for i in $(seq 20); do
  ids+=("$("${A[@]}" container run -d --image "$image" -- sleep 1000)")
done
sleep 1
rss_kb=0
pss_kb=0
for id in "${ids[@]}"; do
  pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["monitor_pid"])' "$run/skiff/containers/$id.json")
  kb=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
  rss_kb=$((rss_kb + kb))
  kb=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")
  pss_kb=$((pss_kb + kb))
done
echo "20 running containers: monitors' resident memory ${rss_kb} KiB (RSS), ${pss_kb} KiB (PSS: shared pages split)"

versions="$(runc --version | head -1); $(crun --version | head -1); $(hyperfine --version)"
python3 - "$work" "$rss_kb" "$runs" "${md:-}" "$pss_kb" "$rounds" "$versions" <<'PY'
import json, sys, datetime, os, re, statistics
work, rss_kb, runs, md, pss_kb, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
versions = sys.argv[7]
per = {}  # command -> [median ms of each round]
INPROC = "skiff-agent runtime, in-process"
names = []
for r in range(1, rounds + 1):
    for part in ("a", "b", "d"):
        for res in json.load(open(f"{work}/round{r}-{part}.json"))["results"]:
            if res["command"] not in per:
                names.append(res["command"])
            per.setdefault(res["command"], []).append(res["median"] * 1000)
        if part == "a":
            name = INPROC
            times = json.load(open(f"{work}/round{r}-c.json"))["times_ms"]
            if name not in per:
                names.append(name)
            per.setdefault(name, []).append(statistics.median(times))
med = {n: statistics.median(v) for n, v in per.items()}
cpu = open("/proc/cpuinfo").read()
model = re.search(r"model name\s*:\s*(.*)", cpu)
lines = [
    "## Agent runtime: container start-to-exit vs runc and crun",
    "",
    f"- Date: {datetime.date.today()} (UTC); machine: {os.cpu_count()} × {model.group(1) if model else 'cpu'}",
    f"- Command: `sudo scripts/bench-runtime.sh --write-md BENCHMARKS.md --runs {runs}` (hyperfine, 10 warm-up runs, {runs} runs per runtime per round, {rounds} interleaved rounds; each runtime's block starts after `sync` and a 1 s settle, so the kernel's deferred teardown of the last block's namespaces is not charged to it)",
    f"- Versions: {versions} (Debian packages).",
    "- Workload: `/bin/true` in the busybox fixture image (runtime/tests/fixtures/make-busybox-image.sh); create, start, wait, delete.",
    "  skiff-agent: `container run --rm` (image already in the layer store; overlayfs rootfs, new pid/mount/uts/ipc/net/cgroup",
    "  namespaces, cgroup limits, caps, seccomp, monitor process). runc and crun: `run` on an OCI bundle of the same rootfs",
    "  (`runc spec`, terminal off, with skiff-agent's default seccomp profile added in its OCI form, which `runc spec`",
    "  leaves out), which deletes the container on exit. crun refuses this hybrid host while",
    "  /sys/fs/cgroup/unified is mounted: its hyperfine runs in a mount namespace with that unmounted (set up once per",
    "  round, outside the timed command), so no wrapper process is in its figure.",
    "- Each runtime's live state is on a tmpfs, as /run is on a systemd host: skiff-agent `--run-dir` (as its systemd unit",
    "  sets it), runc and crun `--root`. skiff-agent's record (written atomically, not fsync'd: a host crash ends every",
    "  container) and its writable layer are on the disk.",
    "- skiff-agent runtime, in-process: the runtime's start, wait and removal as the agent daemon calls them, from one",
    f"  process that stays up (`target/release/skiff-bench-start`, {runs} runs per round after 10 warm-up runs), with the",
    "  runtime set up as the daemon sets it up: each container is handed to a spare monitor (a process of its own per",
    "  container, started and loaded while the last container ran), and a removed container's files are deleted on a",
    "  thread of the runtime after `remove` has taken it out of the store. No pod network, as the daemon would plumb:",
    "  loopback only, as for runc and crun here. runc and crun have no such path: containerd and CRI-O exec them per",
    "  container. The skiff-agent row is the `container run` command line: one process per container, a 190 MB binary,",
    "  spawning its container's monitor itself and deleting its files before it exits.",
    "- The seccomp profile runc and crun get is skiff-agent's in the OCI form (`skiff-bench-start --print-oci-seccomp`):",
    "  the same deny list and clone, clone3 and AF_VSOCK rules; skiff-agent's `personality` rule and its x32 prefix have",
    "  no OCI form and are left out, a few instructions of its filter.",
    "",
    f"| runtime | median of {rounds} rounds | range of the rounds' medians | skiff-agent CLI vs it (>1 = skiff faster; median of the rounds' ratios, range) | skiff in-process vs it |",
    "|---|---:|---:|---:|---:|",
]
def ratio(n, base):
    """The median of the rounds' own ratios (round k against round k), with their range."""
    rs = [a / b for a, b in zip(per[n], per[base]) if b]
    if n == base or not rs:
        return "1.00×"
    return f"{statistics.median(rs):.2f}× ({min(rs):.2f} to {max(rs):.2f})"
for n in names:
    lo, hi = min(per[n]), max(per[n])
    lines.append(f"| {n} | {med[n]:.2f} ms | {lo:.2f} to {hi:.2f} ms | {ratio(n, 'skiff-agent')} | {ratio(n, INPROC)} |")
lines += [
    "",
    f"Memory: 20 containers running `sleep 1000`: their monitors hold {rss_kb} KiB resident ({rss_kb // 20} KiB each, RSS),",
    f"{pss_kb} KiB once pages shared between them are split (PSS, {pss_kb // 20} KiB each), beside the agent daemon",
    "(not part of this figure).",
    "",
]
text = "\n".join(lines)
print(text)
if md:
    cur = open(md).read() if os.path.exists(md) else "# Benchmarks\n"
    head = "## Agent runtime: container start-to-exit vs runc and crun"
    if head in cur:
        start = cur.index(head)
        nxt = cur.find("\n## ", start + 1)
        cur = cur[:start] + text + ("\n" + cur[nxt + 1:] if nxt != -1 else "")
    else:
        cur = cur.rstrip("\n") + "\n\n" + text
    open(md, "w").write(cur)
PY
