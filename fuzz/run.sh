#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 180 s each) and prints executions and coverage.
#   bash fuzz/run.sh [SECONDS_PER_TARGET]
# Needs cargo-fuzz (installed here if missing). The machine has a stable toolchain only, so
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-180}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  log="target/fuzz-$target.log"
  echo "==> $target (${seconds}s)"
  status=0
  cargo fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$log" | tail -n 2 || true
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 || true)
  echo "    coverage: ${cov:-n/a}"
  if [ "$status" -ne 0 ]; then
    echo "    FAILED: see fuzz/$log and fuzz/artifacts/$target/"
    exit "$status"
  fi
done
