#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for a bounded time,
# starting from its committed seed corpus (fuzz/corpus/<target>/). Fails when
# any target crashes, hangs or cannot be built. See docs/FUZZING.md.
#
# Usage: fuzz/run-ci.sh [TARGET...]        (default: every target)
#
# Environment:
#   FUZZ_SECONDS      seconds of fuzzing per target (default 30)
#   FUZZ_JOBS         targets fuzzed at once, one core each (default: nproc)
#   FUZZ_TOOLCHAIN    "nightly" (default: installed if missing) or "stable" to
#                     force the fallback: the pinned stable toolchain with
#                     RUSTC_BOOTSTRAP=1 and no sanitizer
#   FUZZ_SANITIZER    sanitizer on nightly (default: address; "none" builds
#                     in about 40% less CPU time and runs inputs faster)
#   CARGO_TARGET_DIR  where to build (default: fuzz/target); the fuzzers'
#                     working corpora go to its ci-corpus/ (never to fuzz/corpus)
#
# A crash leaves its input in fuzz/artifacts/<target>/; the log says how to
# replay it.
set -euo pipefail
cd "$(dirname "$0")"
started=$SECONDS

secs=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}
((jobs >= 1)) || jobs=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

elapsed() { echo "$((SECONDS - started))s"; }

echo "== fuzz: toolchain"
sanitizer=${FUZZ_SANITIZER:-address}
fuzz=(cargo +nightly fuzz)
if [[ ${FUZZ_TOOLCHAIN:-nightly} == nightly ]] &&
  { rustup run nightly rustc --version 2>/dev/null ||
    rustup toolchain install nightly --profile minimal; }; then
  :
else
  # No nightly: libFuzzer's instrumentation flags (-Z) are accepted by the
  # stable compiler under RUSTC_BOOTSTRAP; AddressSanitizer is not, and the
  # targets are safe Rust, so little is lost without it.
  echo "fuzz: using the stable toolchain with RUSTC_BOOTSTRAP=1 and no sanitizer"
  export RUSTC_BOOTSTRAP=1
  sanitizer=none
  fuzz=(cargo fuzz) # the toolchain rust-toolchain.toml pins
  rustc --version
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version '^0.13'
fi
cargo fuzz --version

echo "== fuzz: fmt"
cargo fmt -- --check

echo "== fuzz: build ($(elapsed))"
if ! cargo metadata --locked --format-version 1 >/dev/null; then
  echo "fuzz/Cargo.lock is out of date (a workspace crate's dependencies changed?)." >&2
  echo "Update it with: cargo metadata --manifest-path fuzz/Cargo.toml >/dev/null" >&2
  exit 1
fi
build_flags=(--sanitizer "$sanitizer")
"${fuzz[@]}" build "${build_flags[@]}"
echo "built in $(elapsed)"

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi

logs=$CARGO_TARGET_DIR/ci-logs
mkdir -p "$logs"
# Run one target; its log goes to $logs/<target>.log.
run_target() {
  local t=$1 work=$CARGO_TARGET_DIR/ci-corpus/$1
  rm -rf "$work"
  mkdir -p "$work" "artifacts/$t"
  touch "$logs/$t.start"
  # -timeout: one input running this long is a hang, reported as a crash.
  # The outer timeout only catches a fuzzer that does not stop by itself.
  timeout --kill-after=10 $((secs + 120)) \
    "${fuzz[@]}" run "${build_flags[@]}" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$logs/$t.log" 2>&1
}

echo "== fuzz: ${#targets[@]} targets, ${secs}s each, $jobs at a time ($(elapsed))"
declare -A pid_of=()
failed=()
# Waits for one running target and records its outcome.
reap() {
  local done_pid status=0 t
  wait -n -p done_pid || status=$?
  for t in "${!pid_of[@]}"; do
    [[ ${pid_of[$t]} == "$done_pid" ]] || continue
    unset "pid_of[$t]"
    local runs speed
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    if ((status == 0)); then
      printf '%-14s ok      %10s runs %7s exec/s\n' "$t" "${runs:-?}" "${speed:-?}"
    else
      printf '%-14s FAILED  (exit %s), log: %s\n' "$t" "$status" "$logs/$t.log"
      failed+=("$t")
    fi
  done
}
for t in "${targets[@]}"; do
  while ((${#pid_of[@]} >= jobs)); do reap; done
  run_target "$t" &
  pid_of[$t]=$!
done
while ((${#pid_of[@]})); do reap; done

replay=("${fuzz[@]}")
[[ -n ${RUSTC_BOOTSTRAP:-} ]] && replay=(RUSTC_BOOTSTRAP=1 "${fuzz[@]}")
for t in "${failed[@]}"; do
  echo "---- $t ($logs/$t.log)"
  # The panic (the property that failed), then libFuzzer's report.
  grep -A3 -m3 'panicked at' "$logs/$t.log" || true
  tail -n 25 "$logs/$t.log"
  # The inputs written during this run.
  find "artifacts/$t" -type f -newer "$logs/$t.start" | while read -r a; do
    echo "replay: (cd fuzz && ${replay[*]} run ${build_flags[*]} $t $a)"
    echo "   or, without libFuzzer: cp fuzz/$a fuzz/corpus/$t/ && (cd fuzz && cargo test)"
  done
done
echo "== fuzz: done in $(elapsed)"
if ((${#failed[@]})); then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
