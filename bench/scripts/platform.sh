#!/usr/bin/env bash
# Measures every row of the platform table in docs/BENCHMARKS.md: hotcopy bench
# on null, malloc, passthru and uring bdevs, plus fio on the same file, each
# run RUNS times (default 3) for SECS seconds (default 10). Prints a markdown
# table of medians. Usage: bench/scripts/platform.sh [OUT.md]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
SECS=${SECS:-10}
DIR=${SCRATCH:-/var/tmp/hotcopy-bench}
OUT=${1:-/dev/stdout}
mkdir -p "$DIR"
cargo build --release -q -p hotcopy
HC=target/release/hotcopy
IMG="$DIR/disk.img"

median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(statistics.median(v))' "$@"; }
json_get() { python3 -c 'import sys,json; d=json.load(sys.stdin); k=sys.argv[1].split("."); [d:=d[p] for p in k]; print(d)' "$1"; }

# row NAME SPEC WORKLOAD QD IOSIZE -> median IOPS, avg us, p99 us, MiB/s, peak RSS
row() {
  local name=$1 spec=$2 w=$3 qd=$4 bs=$5 iops=() avg=() p99=() mib=() rss=()
  for _ in $(seq "$RUNS"); do
    j=$($HC bench --bdev-spec "$spec" -w "$w" -q "$qd" -o "$bs" -t "$SECS" --json)
    iops+=("$(echo "$j" | json_get iops)"); avg+=("$(echo "$j" | json_get lat_us.avg)")
    p99+=("$(echo "$j" | json_get lat_us.p99)"); mib+=("$(echo "$j" | json_get mibps)")
    rss+=("$(echo "$j" | json_get peak_rss_mib)")
  done
  printf '%s|%s|%s|%s|%s|%s\n' "$name" "$(median "${iops[@]}")" "$(median "${avg[@]}")" \
    "$(median "${p99[@]}")" "$(median "${mib[@]}")" "$(median "${rss[@]}")"
}

fio_row() {
  local name=$1 rw=$2 qd=$3 bs=$4 iops=() bw=() p99=()
  for _ in $(seq "$RUNS"); do
    j=$(fio --name=base --filename="$IMG" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --runtime="$SECS" --time_based --size=4G --output-format=json 2>/dev/null)
    iops+=("$(echo "$j" | python3 -c 'import sys,json; j=json.load(sys.stdin)["jobs"][0]; print(j["write"]["iops"]+j["read"]["iops"])')")
    bw+=("$(echo "$j" | python3 -c 'import sys,json; j=json.load(sys.stdin)["jobs"][0]; print((j["write"]["bw_bytes"]+j["read"]["bw_bytes"])/1048576)')")
    p99+=("$(echo "$j" | python3 -c 'import sys,json; j=json.load(sys.stdin)["jobs"][0]; w=j["write"] if j["write"]["iops"]>0 else j["read"]; print(w["clat_ns"]["percentile"]["99.000000"]/1000)')")
  done
  printf '%s|%s|-|%s|%s|-\n' "$name" "$(median "${iops[@]}")" "$(median "${p99[@]}")" "$(median "${bw[@]}")"
}

# A fully written 4 GiB file, so neither tool pays for block allocation.
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne $((4 << 30)) ]; then
  fio --name=fill --filename="$IMG" --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 --size=4G >/dev/null
fi

{
  echo "case|IOPS|avg us|p99 us|MiB/s|peak RSS MiB"
  echo "---|---|---|---|---|---"
  row "null randread QD128" null:1G randread 128 4k
  row "null randwrite QD128" null:1G randwrite 128 4k
  row "null randwrite QD1" null:1G randwrite 1 4k
  row "malloc randread QD128" malloc:1G randread 128 4k
  row "malloc randwrite QD128" malloc:1G randwrite 128 4k
  row "malloc randwrite QD1" malloc:1G randwrite 1 4k
  row "passthru/malloc randwrite QD128" passthru:malloc:1G randwrite 128 4k
  row "passthru/malloc randwrite QD1" passthru:malloc:1G randwrite 1 4k
  row "passthru/malloc randread QD128" passthru:malloc:1G randread 128 4k
  row "passthru/null randwrite QD128" passthru:null:1G randwrite 128 4k
  row "uring randwrite QD32" "uring:$IMG" randwrite 32 4k
  fio_row "fio io_uring randwrite QD32 (same file)" randwrite 32 4k
  row "uring randread QD32" "uring:$IMG" randread 32 4k
  fio_row "fio io_uring randread QD32 (same file)" randread 32 4k
  row "uring 128k seq write QD8" "uring:$IMG" write 8 128k
  fio_row "fio io_uring 128k seq write QD8 (same file)" write 8 128k
} | tee "$OUT"
