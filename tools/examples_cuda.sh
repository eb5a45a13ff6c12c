#!/usr/bin/env bash
# Every example at its defaults with --device cuda (the TileLang kernels; bf16), on a GPU machine:
#
#   bash tools/examples_cuda.sh [DIR]    # figures and one log per example in DIR (default: $OUT, else examples/out)
#
# Prints each example's status and wall time, the last lines of a failing one's log, and exits 1
# if any failed. The first run compiles the kernel families (tens of seconds each, cached after).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-examples/out}}
python=${PYTHON:-python3}
mkdir -p "$out"
failed=0
for script in examples/quickstart.py examples/0[0-9]_*.py; do
  name=$(basename "$script" .py)
  args=(--device cuda)
  [ "$name" = quickstart ] || args+=(--out "$out")
  start=$SECONDS
  if "$python" "$script" "${args[@]}" >"$out/$name.log" 2>&1; then
    echo "$name: ok in $((SECONDS - start)) s"
  else
    echo "$name: FAILED after $((SECONDS - start)) s; the end of $out/$name.log:"
    tail -n 20 "$out/$name.log" | sed 's/^/    /'
    failed=1
  fi
done
exit $failed
