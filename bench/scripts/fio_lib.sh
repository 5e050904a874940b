# Shared by the fio-only scripts (cow_floor.sh, capture_cost.sh): the volume
# and backup files they run on, and the foreground load of `hotcopy bench cow`.
# Sourced, not run.

# fio_setup NAME DIR SIZE: checks that fio is there, then sets A (the volume
# file) and B (the backup file) under DIR, each SIZE bytes of data written
# once with 1 MiB sequential writes (kept between runs when the size fits).
fio_setup() {
  local name=$1 dir=$2 size=$3 bytes f
  command -v fio >/dev/null || { echo "$name: needs fio" >&2; exit 2; }
  mkdir -p "$dir"
  A=$dir/volume.img
  B=$dir/backup.img
  bytes=$(numfmt --from=iec "$size")
  for f in "$A" "$B"; do
    if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" -ne "$bytes" ]; then
      fio --name=fill --filename="$f" --ioengine=io_uring --direct=1 --rw=write --bs=1m \
        --iodepth=16 --size="$size" >/dev/null
    fi
  done
}

# fio_fg SIZE QD SECS: sets FG to the fio job `fg`, the foreground load of
# `hotcopy bench cow` (4 KiB random writes at QD on file A for SECS seconds).
fio_fg() {
  FG=(--name=fg --filename="$A" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
      --iodepth="$2" --size="$1" --runtime="$3" --time_based --randrepeat=0)
}
