#!/usr/bin/env bash
# Fuzz keyward's parsers: hack/fuzz.sh [SECONDS_PER_TARGET] (default 30).
#
# Builds the cargo-fuzz targets in fuzz/ (duration, key_format, verify_request,
# check_request) and runs
# each for SECONDS_PER_TARGET seconds, starting from the seeds in fuzz/seeds/<target>/,
# copied into fuzz/corpus/<target>/ (git-ignored; it grows from run to run, so longer
# runs pick up where the last one stopped). Exits non-zero if any target crashes, panics,
# hangs or runs out of memory, and prints where libFuzzer saved the input.
#
# cargo-fuzz needs nightly compiler flags; the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1, set for this script's cargo commands only. The build uses
# AddressSanitizer; FUZZ_SANITIZER=none runs about five times as many inputs a second
# without it. FUZZ_TARGETS="duration verify_request" runs only those. libFuzzer options
# can follow after `--`: hack/fuzz.sh 600 -- -max_len=8192
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
if [ $# -gt 0 ]; then shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
case "$seconds" in
  '' | *[!0-9]* | 0)
    echo "usage: hack/fuzz.sh [SECONDS_PER_TARGET] [-- LIBFUZZER_OPTIONS...]" >&2
    exit 2
    ;;
esac
sanitizer="${FUZZ_SANITIZER:-address}"
read -r -a targets <<<"${FUZZ_TARGETS:-duration key_format verify_request check_request}"
for t in "${targets[@]}"; do
  [ -d "fuzz/seeds/$t" ] || { echo "unknown fuzz target $t (see fuzz/fuzz_targets/)" >&2; exit 2; }
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

echo "== building the fuzz targets (sanitizer: $sanitizer)"
(cd fuzz && cargo fuzz build -O -s "$sanitizer")

logs=fuzz/target/logs
mkdir -p "$logs"
stamp="$logs/.started"
touch "$stamp"
failed=()
summary=()
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  cp fuzz/seeds/"$t"/* "$corpus"/
  echo "== fuzzing $t for ${seconds}s (log: $logs/$t.log)"
  # -timeout: an input that takes 10 s counts as a hang (a failure, with an artifact).
  if (cd fuzz && cargo fuzz run -O -s "$sanitizer" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "$@") >"$logs/$t.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    summary+=("$t: ${runs:-?} runs, ${rate:-?} execs/s, corpus $(find "$corpus" -type f | wc -l) inputs")
  else
    failed+=("$t")
    summary+=("$t: FAILED")
    echo "-- $t failed:" >&2
    grep -m1 -A3 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$logs/$t.log" >&2 ||
      tail -20 "$logs/$t.log" >&2
    for artifact in $(cd fuzz && find "artifacts/$t" -type f -newer "../$stamp"); do
      echo "-- the input that failed: fuzz/$artifact; replay it with" >&2
      echo "   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O -s $sanitizer $t $artifact)" >&2
    done
  fi
done

echo "== fuzzing summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]}; inputs in fuzz/artifacts/, logs in $logs/" >&2
  exit 1
fi
