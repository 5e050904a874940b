#!/usr/bin/env bash
# The floor under any copy-before-write backup of a busy volume, measured with
# fio alone (no hotcopy code involved).
#
# A full backup of a volume must at least read every byte of it once and write
# every byte once to the backup namespace. This script runs the foreground load
# of `hotcopy bench cow` (4 KiB random writes at QD32 on volume file A) with fio,
# alone and then next to that minimum backup traffic (64 KiB sequential reads of
# A and 64 KiB sequential writes to file B, each rate-limited so that the whole
# volume moves in T seconds), and prints what the foreground keeps: IOPS and p99
# against the alone runs next to it, with what the backup jobs actually moved
# (fio may not reach the asked rate under the load). The backup traffic here is the cheapest
# possible: sequential, no container, no holds, no capture reads at random
# places; a real backup can only cost the foreground more.
#
# Reading it: with uniform writes over the whole volume at the disk's saturating
# rate, every chunk is touched within a few seconds, and copy-before-write must
# read each touched chunk before its first write lands, and (with a container of
# 10% of the volume) write nearly all of it to the backup namespace in the same
# time. So the rows with short T are the ones such a backup faces.
#
# Usage: bench/scripts/cow_floor.sh [--dir DIR] [--size 2G] [--secs 8]
#          [--rounds 3] [--spans "4 8 16 32"] [--qd 32] [--rate-iops N]
#   --rate-iops N   cap the foreground at N IOPS (fio's rate_iops), a load that
#                   leaves the disk headroom
# Prints one markdown row per (round, T) and a table of medians.
set -euo pipefail
DIR=/var/tmp/cowfloor
SIZE=2G
SECS=8
ROUNDS=3
SPANS="4 8 16 32"
QD=32
RATE_IOPS=""
while [ $# -gt 0 ]; do
  case $1 in
    --dir|--size|--secs|--rounds|--spans|--qd|--rate-iops)
      [ $# -ge 2 ] || { echo "cow_floor.sh: $1 needs a value" >&2; exit 2; } ;;&
    --dir) DIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --spans) SPANS=$2; shift 2 ;;
    --qd) QD=$2; shift 2 ;;
    --rate-iops) RATE_IOPS=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "cow_floor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=bench/scripts/fio_lib.sh
. "$(dirname "$0")/fio_lib.sh"
fio_setup cow_floor.sh "$DIR" "$SIZE"
MIB=$(($(numfmt --from=iec "$SIZE") / 1048576))
fio_fg "$SIZE" "$QD" "$SECS"
[ -n "$RATE_IOPS" ] && FG+=(--rate_iops="$RATE_IOPS")

# fg_figures < fio JSON -> "IOPS P99_US READ_MIBPS WRITE_MIBPS": the foreground
# job's figures, and what the backup jobs (if any) actually moved.
fg_figures() {
  python3 -c 'import sys,json
t=sys.stdin.read()
jobs={j["jobname"]:j for j in json.loads(t[t.index("{"):])["jobs"]}
w=jobs["fg"]["write"]
rd=jobs["rd"]["read"]["bw_bytes"]/1048576 if "rd" in jobs else 0
wr=jobs["wr"]["write"]["bw_bytes"]/1048576 if "wr" in jobs else 0
print(w["iops"], w["clat_ns"]["percentile"]["99.000000"]/1000, rd, wr)'
}

RES=$(mktemp)
trap 'rm -f "$RES"' EXIT
echo "| round | T (s) | MiB/s each way asked | read / written | fg IOPS alone | with backup traffic | ratio | p99 alone (us) | with | p99 ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  for t in $SPANS; do
    rate=$(( MIB / t ))
    out=$(fio "${FG[@]}" --output-format=json 2>&1) || { echo "cow_floor.sh: fio failed: $out" >&2; exit 1; }
    read -r i0 p0 _ _ <<<"$(fg_figures <<<"$out")"
    out=$(fio "${FG[@]}" \
      --name=rd --filename="$A" --ioengine=io_uring --direct=1 --rw=read --bs=64k --iodepth=16 \
        --size="$SIZE" --runtime="$SECS" --time_based --rate="${rate}m" \
      --name=wr --filename="$B" --ioengine=io_uring --direct=1 --rw=write --bs=64k --iodepth=16 \
        --size="$SIZE" --runtime="$SECS" --time_based --rate=",${rate}m" \
      --output-format=json 2>&1) || { echo "cow_floor.sh: fio failed: $out" >&2; exit 1; }
    read -r i1 p1 mr mw <<<"$(fg_figures <<<"$out")"
    python3 -c 'import sys
r,t,rate=sys.argv[1:4]; i0,i1,p0,p1,mr,mw=map(float,sys.argv[4:10])
print(f"{r} {t} {rate} {mr:.0f}/{mw:.0f} {i0:.0f} {i1:.0f} {i1/max(i0,1e-9):.3f} {p0:.0f} {p1:.0f} {p1/max(p0,1e-9):.2f}")' \
      "$r" "$t" "$rate" "$i0" "$i1" "$p0" "$p1" "$mr" "$mw" >>"$RES"
    tail -1 "$RES" | awk '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",$1,$2,$3,$4,$5,$6,$7,$8,$9,$10}'
  done
done
echo
echo "Medians over the rounds:"
echo
echo "| T (s) | MiB/s each way asked | IOPS ratio | p99 ratio |"
echo "|---|---|---|---|"
python3 -c 'import sys,statistics,collections
rows=collections.defaultdict(list)
for line in open(sys.argv[1]):
    r,t,rate,moved,i0,i1,ratio,p0,p1,pr=line.split()
    rows[(int(t),rate)].append((float(ratio),float(pr)))
for (t,rate),v in sorted(rows.items()):
    print(f"| {t} | {rate} | {statistics.median(x for x,_ in v):.3f} | {statistics.median(y for _,y in v):.2f} |")' "$RES"
