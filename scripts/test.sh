#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite: the regular build (unit and multi-process
# tests), then the core layers' tests (label `unit`) under AddressSanitizer+UndefinedBehaviorSanitizer and
# ThreadSanitizer. Set AIKIDO_SANITIZERS=0 to skip the latter.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
./scripts/setup.sh
jobs=$(nproc)

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAIKIDO_WITH_TORCH=ON
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j2 --timeout 300)

if [ "${AIKIDO_SANITIZERS:-1}" != 0 ]; then
  for sanitizer in address,undefined thread; do
    dir="build-san-${sanitizer%%,*}"
    echo "== tests under -fsanitize=$sanitizer ($dir)"
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAIKIDO_SANITIZE="$sanitizer" -DAIKIDO_BUILD_BENCH=OFF \
      -DAIKIDO_WITH_TORCH=OFF
    cmake --build "$dir" -j"$jobs" --target unit_tests
    (cd "$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
       TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions="$root/tests/tsan.supp" \
       ctest --output-on-failure -j2 --timeout 600 -L unit)
  done
fi
echo "all tests passed"
