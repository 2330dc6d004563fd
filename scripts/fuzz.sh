#!/usr/bin/env bash
# Builds every libFuzzer target of fuzz/ (clang, -fsanitize=fuzzer,address,undefined) and runs each for SECONDS
# (default 60) from its seed corpus (fuzz/corpus/NAME) and regression inputs (fuzz/regressions/NAME); prints the
# executions per target. Exit status 0 when no target found anything, 1 when one did (the input is kept in
# fuzz/findings/NAME/: fix the parser, then move the input to fuzz/regressions/NAME/, where the normal build's
# fuzz_replay.NAME test replays it), 77 when clang's libFuzzer is not installed.
#
#   scripts/fuzz.sh [SECONDS]
#   AIKIDO_FUZZ_BUILD=DIR   the build tree (default build-fuzz)
#   AIKIDO_FUZZ_JOBS=N      build jobs (default 2)
#   AIKIDO_FUZZ_TARGETS="frame handshake"   only these targets
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${AIKIDO_FUZZ_BUILD:-$root/build-fuzz}
jobs=${AIKIDO_FUZZ_JOBS:-2}

if ! command -v clang++ > /dev/null; then
  echo "fuzz: skipped: clang++ is not installed (scripts/setup.sh installs clang)"
  exit 77
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' > "$probe/probe.cpp"
if ! clang++ -fsanitize=fuzzer,address,undefined "$probe/probe.cpp" -o "$probe/probe" 2> "$probe/err"; then
  echo "fuzz: skipped: clang++ cannot link libFuzzer (install libclang-rt-dev): $(head -c 300 "$probe/err")"
  exit 77
fi

launcher=()
command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DAIKIDO_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "${launcher[@]}" > "$probe/configure.log" || { cat "$probe/configure.log"; exit 1; }
cmake --build "$build" -j "$jobs" > "$probe/build.log" 2>&1 || { tail -50 "$probe/build.log"; exit 1; }

targets=${AIKIDO_FUZZ_TARGETS:-$(cd "$build/bin" && ls fuzz_* | sed 's/^fuzz_//')}
failed=0
printf '%-16s %12s %10s %8s  %s\n' target executions "exec/s" corpus result
for name in $targets; do
  work="$probe/corpus-$name"
  findings="$root/fuzz/findings/$name"
  mkdir -p "$work" "$findings"
  dirs=("$work")
  for d in "$root/fuzz/corpus/$name" "$root/fuzz/regressions/$name"; do [ -d "$d" ] && dirs+=("$d"); done
  log="$probe/$name.log"
  result=ok
  # Leak checks stay on; -timeout catches hangs (a parser that blocks counts as found).
  if ! "$build/bin/fuzz_$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
      -print_final_stats=1 -artifact_prefix="$findings/" "${dirs[@]}" > "$log" 2>&1; then
    result="FOUND something: $(ls "$findings" | head -3 | tr '\n' ' ')"
    failed=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  printf '%-16s %12s %10s %8s  %s\n' "$name" "${execs:-?}" "${rate:-?}" "$(ls "$work" | wc -l)" "$result"
  if [ "$result" != ok ]; then
    grep -E "ERROR|runtime error|fuzz property|terminate|SUMMARY" "$log" | head -10 | sed 's/^/    /'
  fi
  rmdir "$findings" 2> /dev/null || true
done
rmdir "$root/fuzz/findings" 2> /dev/null || true
exit $failed
