#!/usr/bin/env bash
# What one copy-before-write capture costs a saturated disk, in foreground
# writes, measured with fio alone (no hotcopy code involved).
#
# A capture is a chunk read at a random place of the volume (the old content,
# before the write that touched it may land) and, later, a chunk write at the
# same place of the backup namespace (the drain of the container). This script
# runs the foreground load of `hotcopy bench cow` (4 KiB random writes at QD32
# on volume file A) alone, and then next to capture-like traffic at R captures
# a second: random CHUNK reads of A and random CHUNK writes to file B, each at
# R IOPS (fio's rate_iops). What the foreground loses per capture actually
# made is
#
#     k = (IOPS alone - IOPS with the captures) / captures per second
#
# the k of the model in docs/BENCHMARKS.md (session 10), which was fitted to
# hotcopy's timelines: F = B / (1 + k (1 - f)).
#
# Usage: bench/scripts/capture_cost.sh [--dir DIR] [--size 2G] [--secs 8]
#          [--rounds 3] [--rates "4000 8000 12000"] [--chunk 16k] [--qd 32]
# Prints one markdown row per (round, R) and a table of medians.
set -euo pipefail
DIR=/var/tmp/capcost
SIZE=2G
SECS=8
ROUNDS=3
RATES="4000 8000 12000"
CHUNK=16k
QD=32
while [ $# -gt 0 ]; do
  case $1 in
    --dir|--size|--secs|--rounds|--rates|--chunk|--qd)
      [ $# -ge 2 ] || { echo "capture_cost.sh: $1 needs a value" >&2; exit 2; } ;;&
    --dir) DIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --chunk) CHUNK=$2; shift 2 ;;
    --qd) QD=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "capture_cost.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=bench/scripts/fio_lib.sh
. "$(dirname "$0")/fio_lib.sh"
fio_setup capture_cost.sh "$DIR" "$SIZE"
fio_fg "$SIZE" "$QD" "$SECS"

# figures < fio JSON -> "FG_IOPS CAPTURE_READS_PER_S CAPTURE_WRITES_PER_S"
figures() {
  python3 -c 'import sys,json
t=sys.stdin.read()
jobs={j["jobname"]:j for j in json.loads(t[t.index("{"):])["jobs"]}
rd=jobs["rd"]["read"]["iops"] if "rd" in jobs else 0
wr=jobs["wr"]["write"]["iops"] if "wr" in jobs else 0
print(jobs["fg"]["write"]["iops"], rd, wr)'
}

RES=$(mktemp)
trap 'rm -f "$RES"' EXIT
echo "| round | captures/s asked | reads / writes made per s | fg IOPS alone | with the captures | k |"
echo "|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    out=$(fio "${FG[@]}" --output-format=json 2>&1) || { echo "capture_cost.sh: fio failed: $out" >&2; exit 1; }
    read -r i0 _ _ <<<"$(figures <<<"$out")"
    out=$(fio "${FG[@]}" \
      --name=rd --filename="$A" --ioengine=io_uring --direct=1 --rw=randread --bs="$CHUNK" \
        --iodepth=16 --size="$SIZE" --runtime="$SECS" --time_based --randrepeat=0 --rate_iops="$rate" \
      --name=wr --filename="$B" --ioengine=io_uring --direct=1 --rw=randwrite --bs="$CHUNK" \
        --iodepth=16 --size="$SIZE" --runtime="$SECS" --time_based --randrepeat=0 --rate_iops=",$rate" \
      --output-format=json 2>&1) || { echo "capture_cost.sh: fio failed: $out" >&2; exit 1; }
    read -r i1 cr cw <<<"$(figures <<<"$out")"
    python3 -c 'import sys
r,rate=sys.argv[1:3]; i0,i1,cr,cw=map(float,sys.argv[3:7])
made=(cr+cw)/2
k=(i0-i1)/made if made>0 else float("nan")
print(f"{r} {rate} {cr:.0f}/{cw:.0f} {i0:.0f} {i1:.0f} {k:.2f}")' \
      "$r" "$rate" "$i0" "$i1" "$cr" "$cw" >>"$RES"
    tail -1 "$RES" | awk '{printf "| %s | %s | %s | %s | %s | %s |\n",$1,$2,$3,$4,$5,$6}'
  done
done
echo
echo "Medians over the rounds:"
echo
echo "| captures/s asked | k (foreground writes lost per capture) |"
echo "|---|---|"
python3 -c 'import sys,statistics,collections
rows=collections.defaultdict(list)
for line in open(sys.argv[1]):
    r,rate,made,i0,i1,k=line.split()
    rows[int(rate)].append(float(k))
for rate,v in sorted(rows.items()):
    print(f"| {rate} | {statistics.median(v):.2f} |")' "$RES"
