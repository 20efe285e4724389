#!/usr/bin/env bash
# Checked builds of fastcell's kernels, each in a scratch copy of the source tree, so the
# in-place build of the checkout is never touched:
#
#   checks  Cython bounds, wraparound and initialisation checks on (FASTCELL_CYTHON_CHECKS=1),
#           then the whole test suite (or the pytest arguments given).
#   asan    The extensions compiled with AddressSanitizer (gcc/clang -fsanitize=address), then a
#           subset of the suite (or the pytest arguments given) with libasan preloaded into an
#           uninstrumented Python. Any ASan report aborts the run with a non-zero status.
#   all     Both (the default).
#
# Usage:  tools/checked_build.sh [checks|asan|all] [pytest arguments...]
# Environment:
#   PYTHON            the interpreter (default python3); it needs the build and test dependencies
#                     (pip install -e '.[test]', or Cython, numpy, scipy, pytest, hypothesis, torch)
#   FASTCELL_SCRATCH  where to put the scratch copies (default: a new temporary directory)
#   KEEP_SCRATCH=1    keep the scratch copies afterwards
set -euo pipefail

MODE="${1:-all}"
[ $# -gt 0 ] && shift
case "$MODE" in checks|asan|all) ;; *) echo "usage: $0 [checks|asan|all] [pytest args...]" >&2; exit 2;; esac

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${FASTCELL_SCRATCH:-$(mktemp -d -t fastcell-checked.XXXXXX)}"
mkdir -p "$SCRATCH"
if [ "${KEEP_SCRATCH:-0}" != 1 ] && [ -z "${FASTCELL_SCRATCH:-}" ]; then
    trap 'rm -rf "$SCRATCH"' EXIT
fi

# What the ASan run tests by default: the whole suite (only fastcell's C code is instrumented,
# so it costs little more than a normal run). tests/resources/test_long_runs.py checks reference counts
# only there: ASan's quarantine keeps freed memory resident.
ASAN_DEFAULT_TESTS=(tests)

copy_tree() {  # copy_tree DEST: the checkout's files (tracked and untracked, minus build output)
    rm -rf "$1"
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | grep -zvE '(\.so|^fastcell_c/[^/]*\.c)$' \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -C "$1" -xf -
}

check_import() {  # the tests must import the scratch build, not an installed fastcell
    (cd "$1" && "$PYTHON" -c "
import sys, fastcell, fastcell_c.kernel as k
assert fastcell.__file__.startswith(sys.argv[1]), fastcell.__file__
assert k.__file__.startswith(sys.argv[1]), k.__file__
print('testing', k.__file__)" "$1")
}

run_checks() {
    local dir="$SCRATCH/checks"
    echo "== Cython-checked build in $dir"
    copy_tree "$dir"
    (cd "$dir" && FASTCELL_CYTHON_CHECKS=1 "$PYTHON" setup.py -q build_ext --inplace --force)
    check_import "$dir"
    (cd "$dir" && "$PYTHON" -m pytest -q -p no:cacheprovider "$@")
}

run_asan() {
    local dir="$SCRATCH/asan"
    local cc="${CC:-gcc}"
    local libasan libstdcxx
    libasan="$("$cc" -print-file-name=libasan.so)"
    # libstdc++ preloaded too: else ASan finds no __cxa_throw to intercept (libstdc++ comes later,
    # with torch) and the first C++ exception aborts ("real___cxa_throw != 0").
    libstdcxx="$("$cc" -print-file-name=libstdc++.so)"
    if [ ! -e "$libasan" ]; then
        echo "== ASan: $cc has no libasan.so; skipped" >&2
        return 0
    fi
    echo "== AddressSanitizer build in $dir ($libasan)"
    copy_tree "$dir"
    (cd "$dir" && CC="$cc" CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" \
        LDFLAGS="-fsanitize=address" "$PYTHON" setup.py -q build_ext --inplace --force)
    # Python is not instrumented: its leaks are not ours (detect_leaks=0). Allocations that
    # cannot succeed must return NULL (MemoryError) as they do without ASan, not abort.
    # PYTHONMALLOC=malloc: Python's own objects (bytes, small arrays) come from malloc too, so a
    # kernel reading memory that Python has freed is reported.
    local -a tests=("$@")
    [ ${#tests[@]} -eq 0 ] && tests=("${ASAN_DEFAULT_TESTS[@]}")
    (cd "$dir" && export LD_PRELOAD="$libasan $libstdcxx" PYTHONMALLOC=malloc \
        ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}" \
        && check_import "$dir" && "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}")
}

if [ "$MODE" = checks ] || [ "$MODE" = all ]; then run_checks "$@"; fi
if [ "$MODE" = asan ] || [ "$MODE" = all ]; then run_asan "$@"; fi
echo "== done; the in-place build in $ROOT was not touched"
