#!/usr/bin/env bash
# fio over NBD (ioengine=nbd, 4 KiB, QD32) with and without a full backup
# running: hotcopy serve (cow volume on a uring file, backup into a
# repository on the same disk) against qemu-storage-daemon (raw file,
# blockdev-backup sync=full to a raw file on the same disk, which inserts
# QEMU's copy-before-write filter). Interleaved rounds; in every round, for
# each foreground load (randwrite, randread):
#
#   hotcopy        an unthrottled `hotcopy backup start` (full, into a fresh repository)
#   qemu           an unthrottled blockdev-backup (sync=full, into a fresh raw file)
#   qemu-throttled (unless --no-throttle) the same with the job's `speed` set to
#                  the MiB/s hotcopy's backup achieved in this round and load
#
# Each of these is ONE fio run on one NBD connection: PRE seconds of load
# alone, then the backup (fio keeps running), then POST seconds alone, then
# SIGINT. fio logs every completion with a unix-epoch timestamp
# (--write_lat_log --log_avg_msec=0 --log_unix_epoch=1) and the log is cut at
# the backup job's own start and end (hotcopy: `started` and `elapsed_s` of
# `backup status --json`; QEMU: the QMP timestamps of JOB_STATUS_CHANGE
# "running" and BLOCK_JOB_COMPLETED):
#   baseline = completions in [fio start + 1 s, backup start) and
#              [backup end + 0.5 s, fio stop), pooled
#   during   = completions in [backup start, backup end)
# IOPS = completions / window length; p99 and mean are fio's completion
# latency (clat) over the same completions. The ratio during/baseline is
# thus taken within one run, against load measured just before and after.
#
# Usage: bench/scripts/nbd_backup_vs_qemu.sh [--rounds N] [--dir DIR] [--hotcopy BIN]
#          [--pre S] [--post S] [--workloads "randwrite randread"] [--no-throttle]
#          [--size 2G] [--keep] [--hc-container-slots N] [--hc-idle poll|sleep]
#   --hc-container-slots N  start hotcopy's backup through `hotcopy rpc
#                           hotcopy_backup_start` with container_slots=N (64 KiB
#                           slots; the daemon's default is 64) and poll its status
#   --hc-idle sleep         run the daemon's reactor with `idle: sleep` (default:
#                           the daemon's default, busy-poll)
#   --keep                  keep the images and fio's per-I/O logs
#   --table FILE...         only print the table of earlier results.jsonl files
#                           (rounds renumbered in order across the files)
# Environment: HOTCOPY (the binary; default /work/target-qbench/release/hotcopy,
# else target/release/hotcopy). Needs fio (nbd engine), qemu-storage-daemon,
# qemu-img, python3, taskset, setsid. The servers (hotcopy serve, one reactor;
# and qemu-storage-daemon, no iothread) are confined to CPU 0, fio to CPU 1,
# and each runs in its own session: with autogroup scheduling
# (kernel.sched_autogroup_enabled=1) a session is one scheduling group, and a
# server sharing fio's group sees its CPU share on a contended CPU change with
# its own helper threads (io_uring workers) during a backup.
# Results: DIR/run-*/results.jsonl, and a markdown table on stdout.
set -euo pipefail

ROUNDS=3
DIR=/var/tmp/qbench
SIZE=2G
PRE_S=6
POST_S=6
WORKLOADS="randwrite randread"
THROTTLE=1
KEEP=0
MAX_BACKUP_S=900
HC_PORT=10931
Q_PORT=10932
SERVER_CPU=0
FIO_CPU=1
HOTCOPY=${HOTCOPY:-}
HC_SLOTS=""
HC_IDLE=""
TABLE=""

while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --hotcopy) HOTCOPY=$2; shift 2 ;;
    --pre) PRE_S=$2; shift 2 ;;
    --post) POST_S=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --no-throttle) THROTTLE=0; shift ;;
    --size) SIZE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --hc-container-slots) HC_SLOTS=$2; shift 2 ;;
    --hc-idle) HC_IDLE=$2; shift 2 ;;
    --table) shift; TABLE="$*"; break ;;
    -h|--help) sed -n '2,47p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- table
print_table() {
python3 - "$@" <<'EOF'
import json, sys, statistics as S
rows, base = [], 0
for path in sys.argv[1:]:
    part = [json.loads(l) for l in open(path)]
    for r in part:
        r["round"] += base
    base = max([r["round"] for r in part] + [base])
    rows += part
med = lambda v: S.median(v) if v else float("nan")
systems = ["hotcopy", "qemu", "qemu-throttled"]
hc = [r for r in rows if r["system"] == "hotcopy"]
if hc:
    print(f"hotcopy: RAM container of {hc[0]['extra']['container_slots']} × 64 KiB slots, "
          f"reactor idle: {hc[0]['extra']['idle']}")
def f(r):
    b, d = r["base"], r["during"]
    return (b["iops"], b["p99_ms"], d["iops"], d["iops"] / b["iops"], d["p99_ms"] or float("nan"),
            d["mean_ms"] or float("nan"), r["backup_mibps"], r["backup_s"])
for wl in dict.fromkeys(r["workload"] for r in rows):
    print(f"\n### 4k {wl}, QD32, fio ioengine=nbd\n")
    print("| system | round | baseline IOPS | baseline p99 ms | during IOPS | ratio | during p99 ms | during mean ms | backup MiB/s | backup s | load1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in systems:
        rs = sorted((r for r in rows if r["workload"] == wl and r["system"] == s), key=lambda r: r["round"])
        if not rs:
            continue
        for r in rs:
            v = f(r)
            print(f"| {s} | {r['round']} | {v[0]:,.0f} | {v[1]:.2f} | {v[2]:,.0f} | {v[3]:.3f} | {v[4]:.2f} | {v[5]:.2f} | {v[6]:.0f} | {v[7]:.1f} | {r['load'][0]:.1f}–{r['load'][1]:.1f} |")
        m = [med([f(r)[i] for r in rs]) for i in range(8)]
        print(f"| **{s}** | median | **{m[0]:,.0f}** | {m[1]:.2f} | **{m[2]:,.0f}** | **{m[3]:.3f}** | **{m[4]:.2f}** | {m[5]:.2f} | **{m[6]:.0f}** | {m[7]:.1f} | |")
    print("\nSame-round ratios hotcopy / QEMU (median of the per-round ratios):\n")
    for other in systems[1:]:
        pairs = []
        for r in (x for x in rows if x["workload"] == wl and x["system"] == "hotcopy"):
            o = [x for x in rows if x["workload"] == wl and x["system"] == other and x["round"] == r["round"]]
            if o:
                a, b = f(r), f(o[0])
                pairs.append((a[0] / b[0], a[2] / b[2], a[3] / b[3], a[4] / b[4], a[6] / b[6]))
        if pairs:
            m = [med([p[i] for p in pairs]) for i in range(5)]
            per = " / ".join(f"{p[2]:.2f}" for p in pairs)
            print(f"- vs {other}: baseline IOPS {m[0]:.2f}×, during-backup IOPS {m[1]:.2f}×, "
                  f"ratio (during/baseline) {per} → **{m[2]:.2f}×**, during p99 {m[3]:.2f}×, backup MiB/s {m[4]:.2f}×")
EOF
}

if [ -n "$TABLE" ]; then print_table $TABLE; exit 0; fi

cd "$(dirname "$0")/../.."
if [ -z "$HOTCOPY" ]; then
  if [ -x /work/target-qbench/release/hotcopy ]; then HOTCOPY=/work/target-qbench/release/hotcopy
  else HOTCOPY=target/release/hotcopy; fi
fi
for t in "$HOTCOPY" fio qemu-storage-daemon qemu-img python3 taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done

mkdir -p "$DIR"
OUT="$DIR/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
: >"$RES"
HC_IMG="$DIR/hc-vol.img"      # hotcopy's volume (filled)
Q_IMG="$DIR/q-vol.img"        # qemu's volume (filled)
Q_TGT="$DIR/q-backup.img"     # qemu's backup target (fresh and sparse for every backup)
HC_SOCK="$OUT/hc.sock"
QMP_SOCK="$OUT/qmp.sock"
HC_PID=""
Q_PID=""
FIO_PID=""

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

cleanup() {
  if [ -n "$FIO_PID" ]; then kill "$FIO_PID" 2>/dev/null || true; fi
  if [ -n "$HC_PID" ]; then kill -TERM "$HC_PID" 2>/dev/null || true; wait "$HC_PID" 2>/dev/null || true; fi
  if [ -n "$Q_PID" ]; then kill -TERM "$Q_PID" 2>/dev/null || true; wait "$Q_PID" 2>/dev/null || true; fi
  if [ "$KEEP" = 0 ]; then
    rm -f "$HC_IMG" "$Q_IMG" "$Q_TGT" "$DIR"/hc-repo-*.img
    find "$OUT" \( -name '*_lat.1.log' -o -name '*_clat.1.log' -o -name '*_slat.1.log' \) -delete
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- helpers (python)
cat >"$OUT/qmp.py" <<'EOF'
# Minimal QMP client.
# qmp.py SOCK backup SRC_NODE TARGET_FILE SPEED_BYTES
#   adds TARGET_FILE as a raw node (io_uring, O_DIRECT), runs blockdev-backup
#   sync=full from SRC_NODE (QEMU inserts its copy-before-write filter over
#   it), waits for the job's end, deletes the target nodes, and prints one JSON
#   line with the job's QMP event timestamps.
# qmp.py SOCK quit
import json, socket, sys, time

class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())          # greeting
        self.cmd("qmp_capabilities")
    def read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)
    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = self.read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            elif "return" in m:
                return m["return"]
    def event(self):
        return self.events.pop(0) if self.events else self.read()

def ts(ev):
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6

q = Qmp(sys.argv[1])
if sys.argv[2] == "quit":
    q.cmd("quit")
    sys.exit(0)
src, tgt, speed = sys.argv[3], sys.argv[4], int(sys.argv[5])
q.cmd("blockdev-add", driver="file", **{"node-name": "tgtfile"}, filename=tgt,
      aio="io_uring", cache={"direct": True})
q.cmd("blockdev-add", driver="raw", **{"node-name": "tgt"}, file="tgtfile")
args = {"job-id": "bk", "device": src, "target": "tgt", "sync": "full"}
if speed > 0:
    args["speed"] = speed
out = {"cmd_s": time.time(), "start_s": None, "end_s": None}
q.cmd("blockdev-backup", **args)
while True:
    ev = q.event()
    name = ev["event"]
    if name == "JOB_STATUS_CHANGE" and ev["data"]["id"] == "bk":
        st = ev["data"]["status"]
        if st == "created":
            out["created_s"] = ts(ev)
        if st == "running" and out["start_s"] is None:
            out["start_s"] = ts(ev)
    elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and ev["data"]["device"] == "bk":
        out["end_s"] = ts(ev)
        out["event"] = name
        out["len"] = ev["data"]["len"]
        out["offset"] = ev["data"]["offset"]
        out["error"] = ev["data"].get("error")
        break
if out["start_s"] is None:
    out["start_s"] = out.get("created_s", out["cmd_s"])
# auto-dismiss: the job goes by itself, and its filter with it.
for _ in range(100):
    if not any(j["id"] == "bk" for j in q.cmd("query-jobs")):
        break
    time.sleep(0.05)
q.cmd("blockdev-del", **{"node-name": "tgt"})
q.cmd("blockdev-del", **{"node-name": "tgtfile"})
print(json.dumps(out))
EOF

cat >"$OUT/window.py" <<'EOF'
# window.py CLAT_LOG BACKUP_START_S BACKUP_END_S
# -> JSON {base, pre, post, during}: each {iops, p99_ms, mean_ms, n, window_s}
import json, sys
path, s0, s1 = sys.argv[1], float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000
t, lat = [], []
with open(path) as f:
    for line in f:
        p = line.split(",")
        t.append(int(p[0])); lat.append(int(p[1]))
first, last = t[0], t[-1]
def stats(wins):
    sel = sorted(l for ts, l in zip(t, lat) if any(a <= ts < b for a, b in wins))
    w = sum(max(0, b - a) for a, b in wins) / 1000
    n = len(sel)
    return {"iops": n / w if w > 0 else 0.0,
            "p99_ms": sel[max(0, -(-99 * n // 100) - 1)] / 1e6 if n else None,
            "mean_ms": sum(sel) / n / 1e6 if n else None, "n": n, "window_s": w}
pre, post = (first + 1000, s0), (s1 + 500, last)
print(json.dumps({"base": stats([pre, post]), "pre": stats([pre]), "post": stats([post]),
                  "during": stats([(s0, s1)]), "log_s": [first / 1000, last / 1000]}))
EOF

jget() { python3 -c 'import sys,json; d=json.loads(sys.argv[2]); [d:=d[k] for k in sys.argv[1].split(".")]; print(d)' "$1" "$2"; }
load1() { cut -d' ' -f1 /proc/loadavg; }
summary() {
  tail -1 "$RES" | python3 -c 'import sys, json
d = json.load(sys.stdin); b, u = d["base"], d["during"]
print("base %.0f IOPS (pre %.0f, post %.0f), during %.0f IOPS p99 %.2f ms, backup %.0f MiB/s %.1f s"
      % (b["iops"], d["pre"]["iops"], d["post"]["iops"], u["iops"], u["p99_ms"] or 0, d["backup_mibps"], d["backup_s"]))'
}

# fio_start URI RW PREFIX: fio in the background (FIO_PID), until SIGINT
fio_start() {
  setsid fio --name=t --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 --size="$SIZE" \
    --time_based --runtime=3600 --cpus_allowed="$FIO_CPU" \
    --write_lat_log="$3" --log_avg_msec=0 --log_unix_epoch=1 \
    --output-format=json --output="$3.json" >/dev/null &
  FIO_PID=$!
}
fio_stop() { kill -INT "$FIO_PID"; wait "$FIO_PID" || true; FIO_PID=""; }

fill() { # fill FILE: every byte written, so backups copy data, not holes
  fio --name=fill --filename="$1" --rw=write --bs=1M --iodepth=16 --ioengine=libaio --direct=1 \
    --size="$SIZE" --output-format=terse >/dev/null
}

# record SYSTEM ROUND WL WINDOWJSON BYTES SECONDS LOAD0 EXTRAJSON
record() {
  python3 - "$@" "$(load1)" >>"$RES" <<'EOF'
import json, sys
sysname, r, wl, win, by, el, l0, extra, l1 = sys.argv[1:]
d = json.loads(win)
d.update({"round": int(r), "system": sysname, "workload": wl, "backup_s": float(el),
          "backup_mibps": int(by) / float(el) / 2**20, "load": [float(l0), float(l1)],
          "extra": json.loads(extra)})
print(json.dumps(d))
EOF
}

# ---------------------------------------------------------------- hotcopy
hc_start() {
  local r=$1 cfg=()
  rm -f "$HC_SOCK"
  for wl in $WORKLOADS; do
    rm -f "$DIR/hc-repo-$wl.img"
    "$HOTCOPY" repo format --repo "uring:$DIR/hc-repo-$wl.img@3G" >/dev/null
  done
  if [ -n "$HC_IDLE" ]; then
    printf 'reactors:\n  cores: 1\n  idle: %s\n' "$HC_IDLE" >"$OUT/hc.yaml"
    cfg=(--config "$OUT/hc.yaml")
  fi
  setsid taskset -c "$SERVER_CPU" "$HOTCOPY" serve "${cfg[@]}" --bdev "vol=cow:uring:$HC_IMG" \
    --nbd "vol@127.0.0.1:$HC_PORT" --rpc-socket "$HC_SOCK" >"$OUT/r$r-hotcopy-serve.log" 2>&1 &
  HC_PID=$!
  for _ in $(seq 100); do
    "$HOTCOPY" rpc rpc_get_methods --socket "$HC_SOCK" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "hotcopy serve did not start; see $OUT/r$r-hotcopy-serve.log" >&2; exit 1
}
hc_stop() { kill -TERM "$HC_PID"; wait "$HC_PID" || echo "hotcopy serve exited with $?" >&2; HC_PID=""; }

# hc_backup REPO_FILE ERRFILE: a full backup of vol; prints its final status JSON
hc_backup() {
  if [ -z "$HC_SLOTS" ]; then
    "$HOTCOPY" backup start --rpc-socket "$HC_SOCK" --volume vol --repo "uring:$1" --wait --json 2>"$2"
    return
  fi
  "$HOTCOPY" rpc hotcopy_backup_start --socket "$HC_SOCK" --param volume=vol \
    --param "repo=uring:$1" --param "container_slots=$HC_SLOTS" >/dev/null 2>"$2" || return 1
  local st
  while :; do
    sleep 0.2
    st=$("$HOTCOPY" backup status --rpc-socket "$HC_SOCK" --volume vol --json 2>>"$2") || return 1
    [ "$(jget state "$st")" = running ] || break
  done
  echo "$st"
}

hc_round() {
  local r=$1 uri="nbd://127.0.0.1:$HC_PORT/vol" wl
  hc_start "$r"
  export -f hc_backup jget
  export HOTCOPY HC_SOCK HC_SLOTS
  for wl in $WORKLOADS; do
    local l0 pre="$OUT/r$r-hotcopy-$wl" st rc=0
    l0=$(load1)
    fio_start "$uri" "$wl" "$pre"
    sleep "$PRE_S"
    st=$(timeout "$MAX_BACKUP_S" bash -c 'hc_backup "$@"' _ "$DIR/hc-repo-$wl.img" "$pre-backup.err") || rc=$?
    if [ $rc != 0 ] || [ "$(jget state "${st:-null}" 2>/dev/null)" != complete ]; then
      echo "hotcopy backup failed (rc $rc): $st $(cat "$pre-backup.err")" >&2
      "$HOTCOPY" backup status --rpc-socket "$HC_SOCK" --json >&2 || true
      "$HOTCOPY" backup cancel --rpc-socket "$HC_SOCK" --json >&2 || true
      fio_stop; hc_stop; exit 1
    fi
    sleep "$POST_S"
    fio_stop
    echo "$st" >"$pre-status.json"
    local s0 el bytes
    s0=$(python3 -c 'import sys,datetime; print(datetime.datetime.fromisoformat(sys.argv[1].replace("Z","+00:00")).timestamp())' "$(jget started "$st")")
    el=$(jget elapsed_s "$st")
    bytes=$(( $(jget chunks_in_scope "$st") * $(jget chunk_size "$st") ))
    record hotcopy "$r" "$wl" "$(python3 "$OUT/window.py" "${pre}_clat.1.log" "$s0" "$(python3 -c "print($s0 + $el)")")" \
      "$bytes" "$el" "$l0" "$(python3 -c 'import sys,json; s=json.loads(sys.argv[1]); print(json.dumps({k: s[k] for k in ("container_slots","paced_writes","held_writes","slot_waits","chunks_copied","chunks_saved","freeze_us")} | {"idle": sys.argv[2]}))' "$st" "${HC_IDLE:-poll}")"
    log "round $r hotcopy $wl: $(summary)"
  done
  hc_stop
}

# ---------------------------------------------------------------- qemu
q_start() {
  local r=$1
  rm -f "$QMP_SOCK"
  setsid taskset -c "$SERVER_CPU" qemu-storage-daemon \
    --blockdev "driver=file,node-name=srcfile,filename=$Q_IMG,aio=io_uring,cache.direct=on" \
    --blockdev driver=raw,node-name=src,file=srcfile \
    --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$Q_PORT" \
    --export type=nbd,id=exp0,node-name=src,name=vol,writable=on \
    --chardev "socket,id=qmp0,path=$QMP_SOCK,server=on,wait=off" \
    --monitor chardev=qmp0 >"$OUT/r$r-qemu.log" 2>&1 &
  Q_PID=$!
  for _ in $(seq 100); do [ -S "$QMP_SOCK" ] && return 0; sleep 0.1; done
  echo "qemu-storage-daemon did not start; see $OUT/r$r-qemu.log" >&2; exit 1
}
q_stop() { python3 "$OUT/qmp.py" "$QMP_SOCK" quit || kill -TERM "$Q_PID"; wait "$Q_PID" || true; Q_PID=""; }

# q_backup ROUND WL SYSTEM SPEED_BYTES (0: unthrottled)
q_backup() {
  local r=$1 wl=$2 sys=$3 speed=$4 uri="nbd://127.0.0.1:$Q_PORT/vol"
  local l0 pre="$OUT/r$r-$sys-$wl" out rc=0
  l0=$(load1)
  rm -f "$Q_TGT"; qemu-img create -q -f raw "$Q_TGT" "$SIZE"
  fio_start "$uri" "$wl" "$pre"
  sleep "$PRE_S"
  out=$(timeout "$MAX_BACKUP_S" python3 "$OUT/qmp.py" "$QMP_SOCK" backup src "$Q_TGT" "$speed") || rc=$?
  if [ $rc != 0 ] || [ "$(jget event "$out")" != BLOCK_JOB_COMPLETED ] || [ "$(jget error "$out")" != None ]; then
    echo "qemu backup failed (rc $rc): $out" >&2; fio_stop; q_stop; exit 1
  fi
  sleep "$POST_S"
  fio_stop
  rm -f "$Q_TGT"
  echo "$out" >"$pre-job.json"
  local s0 s1; s0=$(jget start_s "$out"); s1=$(jget end_s "$out")
  record "$sys" "$r" "$wl" "$(python3 "$OUT/window.py" "${pre}_clat.1.log" "$s0" "$s1")" \
    "$(jget len "$out")" "$(python3 -c "print($s1 - $s0)")" "$l0" "{\"speed\": $speed}"
  log "round $r $sys $wl: $(summary)"
}

q_round() {
  local r=$1 wl speed
  q_start "$r"
  for wl in $WORKLOADS; do
    q_backup "$r" "$wl" qemu 0
    if [ "$THROTTLE" = 1 ]; then
      # hotcopy's achieved MiB/s in this round and load, as the job's speed
      speed=$(python3 -c '
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d["round"] == int(sys.argv[2]) and d["system"] == "hotcopy" and d["workload"] == sys.argv[3]:
        print(int(d["backup_mibps"] * 2**20))' "$RES" "$r" "$wl")
      if [ -n "$speed" ]; then q_backup "$r" "$wl" qemu-throttled "$speed"; fi
    fi
  done
  q_stop
}

# ---------------------------------------------------------------- main
log "output: $OUT; filling $HC_IMG and $Q_IMG ($SIZE each)"
fill "$HC_IMG"
fill "$Q_IMG"
for r in $(seq "$ROUNDS"); do
  # hotcopy first in every round: the throttled QEMU run uses its figure
  hc_round "$r"
  q_round "$r"
done

print_table "$RES"
log "results: $RES"
