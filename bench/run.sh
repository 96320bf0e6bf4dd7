#!/usr/bin/env bash
# Load benchmark of keypackage-server beside the ceiling of the same SQL, in one run.
#
#   bench/run.sh [sqlite|postgres|both]     scenarios at each concurrency + ceilings + ratios
#   bench/run.sh growth [sqlite|postgres]   consume p50/p99 with 10k, 100k, 1M users x 10 packages,
#                                           then server RSS while 1M distinct targets are requested
#   bench/run.sh compare [sqlite|postgres]  consume and upload of openmls packages, the build of
#                                           BASELINE (a git revision) beside this one, alternately
#   bench/run.sh stages [sqlite|postgres]   consume with the caller and pair limits on (STAGES,
#                                           default 600/3) beside them off, alternately, many
#                                           callers; then one token flooding distinct targets
#
# Everything runs on this machine: the server, the database and the load generator share the
# cores. Every load loop is bounded in time and count and targets 127.0.0.1 only.
#
# Settings (environment):
#   CONNS="16 64"   concurrencies        DURATION=20   measured seconds per run
#   USERS=200000    seeded users         WRITERS=100000 uploaders (pre-signed tokens)
#   SCENARIOS="healthz consume upload mixed status"
#   BUDGET=10       KPS_CONSUME_LIMIT_PER_MINUTE of the server and the ceilings
#   CALLER_BUDGET=0 PAIR_BUDGET=0   the per-caller and per-pair limits (0: off, as v1)
#   CALLERS=100000  distinct callers of the pgbench ceiling
#   PGBENCH_CONNS="4 8 16 64"   client counts of the pgbench ceiling (the best one is the ceiling)
#   PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres   (a fresh database is created)
#   PG_SHARED_BUFFERS=6GB   instead, a private Postgres instance (initdb in $OUT/pg, port
#                           PG_PORT=15433, stock settings but this shared_buffers), removed at exit
#   PORT=18087      RUST_LOG=info (the server's default; per-request log lines go to a file)
#   SERVER=target/release/keypackage-server   the server binary (another build, to set beside)
#   GROWTH_SIZES="10000 100000 1000000"   RSS_TARGETS=1000000 (0 skips the RSS run)
#   RSS_CALLERS=100000    distinct callers of the RSS run (claim stages on: 600/3 per minute)
#   OUT=/tmp/kps-bench-<time>             where logs and results go (charts: $OUT/charts/*.svg)
#   BASELINE=<rev> ROUNDS=2 COMPARE_SCENARIOS="consume upload"   for compare
#   STAGES="600 3" FLOOD_TARGETS=100000   for stages (ROUNDS too)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-both}"
CONNS="${CONNS:-16 64}"
DURATION="${DURATION:-20}"
WARMUP="${WARMUP:-2}"
USERS="${USERS:-200000}"
WRITERS="${WRITERS:-100000}"
SIZE="${SIZE:-256}"
SCENARIOS="${SCENARIOS:-healthz consume upload mixed status}"
BUDGET="${BUDGET:-10}"
CALLER_BUDGET="${CALLER_BUDGET:-0}"
PAIR_BUDGET="${PAIR_BUDGET:-0}"
CALLERS="${CALLERS:-100000}"
PGBENCH_CONNS="${PGBENCH_CONNS:-4 8 16 64}"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PORT="${PORT:-18087}"
GROWTH_SIZES="${GROWTH_SIZES:-10000 100000 1000000}"
RSS_TARGETS="${RSS_TARGETS:-1000000}"
RSS_CALLERS="${RSS_CALLERS:-100000}"
OUT="${OUT:-/tmp/kps-bench-$(date +%Y%m%d-%H%M%S)}"
export RUST_LOG="${RUST_LOG:-info}"

SERVER="${SERVER:-target/release/keypackage-server}"
BENCH="${BENCH:-target/release/kps-bench}"
URL="http://127.0.0.1:${PORT}"
SECRET="bench-secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export KPS_JWT_SECRET="$SECRET"
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
SERVER_PID=""
PG_DB=""

log() { printf '%s\n' "$*" | tee -a "$RESULTS" >&2; }

cleanup() {
  stop_server
  if [[ -n "$PG_DB" ]]; then
    psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  stop_private_pg
}
trap cleanup EXIT

# Postgres refuses to run as root: the private instance then runs as the user postgres.
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

PG_PRIVATE=""
# With PG_SHARED_BUFFERS set, a private instance of the newest Postgres installed, with that
# shared_buffers and otherwise initdb's defaults; PG_ADMIN_URL points at it.
start_private_pg() {
  [[ -n "${PG_SHARED_BUFFERS:-}" ]] || return 0
  local bin port=${PG_PORT:-15433}
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [[ -x "$bin/initdb" ]] || { echo "PG_SHARED_BUFFERS needs Postgres' initdb (/usr/lib/postgresql/*/bin)" >&2; exit 1; }
  PG_PRIVATE="$OUT/pg"
  mkdir -p "$PG_PRIVATE"
  [[ $(id -u) == 0 ]] && chown postgres "$PG_PRIVATE"
  as_pg "$bin/initdb" -D "$PG_PRIVATE/data" -U postgres --auth=trust >"$OUT/pg-initdb.log" 2>&1
  as_pg "$bin/pg_ctl" -D "$PG_PRIVATE/data" -l "$PG_PRIVATE/server.log" -w \
    -o "-p $port -k $PG_PRIVATE -c listen_addresses=127.0.0.1 -c shared_buffers=$PG_SHARED_BUFFERS" \
    start >/dev/null
  PG_ADMIN_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "# private Postgres $("$bin/postgres" --version | awk '{print $3}') on port $port, shared_buffers=$PG_SHARED_BUFFERS"
}

stop_private_pg() {
  [[ -n "$PG_PRIVATE" ]] || return 0
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  as_pg "$bin/pg_ctl" -D "$PG_PRIVATE/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_PRIVATE"
  PG_PRIVATE=""
}

build() {
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release -p keypackage-server -p kps-bench >&2
  fi
}

machine() {
  log "# $(date -Is) mode=$MODE"
  log "# nproc=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')\" mem=$(free -g | awk '/Mem:/{print $2}')GiB"
  log "# load: $(uptime | sed 's/.*load average/load average/')"
  log "# CONNS=\"$CONNS\" DURATION=$DURATION USERS=$USERS WRITERS=$WRITERS SIZE=$SIZE BUDGET=$BUDGET CALLER_BUDGET=$CALLER_BUDGET PAIR_BUDGET=$PAIR_BUDGET RUST_LOG=$RUST_LOG"
}

# A fresh database for $1 (sqlite|postgres); sets DB_URL.
fresh_db() {
  if [[ "$1" == sqlite ]]; then
    DB_URL="sqlite://$OUT/kps.db"
    rm -f "$OUT"/kps.db*
  else
    if [[ -n "$PG_DB" ]]; then
      psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
    fi
    PG_DB="kps_bench_$$"
    psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $PG_DB" >/dev/null
    DB_URL="${PG_ADMIN_URL%/*}/$PG_DB"
  fi
}

start_server() {
  KPS_LISTEN_ADDR="127.0.0.1:$PORT" DATABASE_URL="$DB_URL" KPS_DATA_DIR="$OUT/data" \
    KPS_CONSUME_LIMIT_PER_MINUTE="$BUDGET" \
    KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE="$CALLER_BUDGET" KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE="$PAIR_BUDGET" \
    "$SERVER" >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    if curl -fs "$URL/healthz" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$OUT/server.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "the server did not become ready" >&2
  exit 1
}

stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

bench_run() { # scenario conns label [extra args]
  local scenario=$1 conns=$2 label=$3
  shift 3
  "$BENCH" run "$scenario" --url "$URL" -c "$conns" -d "$DURATION" --warmup "$WARMUP" \
    --users "$USERS" --writers "$WRITERS" --size "$SIZE" --label "$label" \
    --server-pid "$SERVER_PID" "$@" | tee -a "$RESULTS"
}

store_ceiling() { # scenario conns label [extra args]
  local scenario=$1 conns=$2 label=$3
  shift 3
  "$BENCH" ceiling "$scenario" --database-url "$DB_URL" --budget-per-minute "$BUDGET" \
    -c "$conns" -d "$DURATION" --warmup "$WARMUP" --users "$USERS" --writers "$WRITERS" \
    --size "$SIZE" --label "$label" "$@" | tee -a "$RESULTS"
}

# pgbench with the store's SQL; prints a RESULT line with ops/s (2 per mixed transaction).
pgbench_ceiling() { # scenario conns label
  local scenario=$1 conns=$2 label=$3
  local interval=$((60000000 / BUDGET)) # µs, as the store binds it
  local window=$((interval * BUDGET))
  # The per-caller stages as the store binds them; 0 turns a stage off.
  local caller_interval=0 caller_window=0 pair_interval=0 pair_window=0
  if [[ "$CALLER_BUDGET" -gt 0 ]]; then
    caller_interval=$((60000000 / CALLER_BUDGET)); caller_window=$((caller_interval * CALLER_BUDGET))
  fi
  if [[ "$PAIR_BUDGET" -gt 0 ]]; then
    pair_interval=$((60000000 / PAIR_BUDGET)); pair_window=$((pair_interval * PAIR_BUDGET))
  fi
  local dir="$OUT/pgbench-$scenario-$conns"
  rm -rf "$dir" && mkdir -p "$dir"
  local bench_bin
  bench_bin="$(pwd)/$BENCH"
  (cd "$dir" && "$bench_bin" cpu --db-name "$PG_DB" -- pgbench -n -M prepared -c "$conns" -j 2 \
    -T "$DURATION" -l -D users="$USERS" -D writers="$WRITERS" -D interval="$interval" \
    -D window="$window" -D callers="$CALLERS" -D caller_interval="$caller_interval" \
    -D caller_window="$caller_window" -D pair_interval="$pair_interval" -D pair_window="$pair_window" -f "$OUT/pgbench/$scenario.sql" "${DB_URL}" >"$dir/out.txt" 2>&1) || {
    cat "$dir/out.txt" >&2
    return 1
  }
  local tps failed per db_cpu
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$dir/out.txt" | head -n1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$dir/out.txt")
  db_cpu=$(sed -n 's/^CPU db_cpu_s=\([0-9.]*\).*/\1/p' "$dir/out.txt")
  per=1
  [[ "$scenario" == mixed ]] && per=2
  # Transaction latencies (µs, column 3 of the per-transaction log) for the percentiles.
  local pct
  pct=$(cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '
    { v[NR] = $1 }
    END { if (NR == 0) { print "p50_ms=0 p99_ms=0 p999_ms=0"; exit }
          printf "p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f", v[int(NR*0.5)+1]/1000, v[int(NR*0.99)+1]/1000, v[int(NR*0.999)+1]/1000 }')
  rm -f "$dir"/pgbench_log.*
  local line
  line="RESULT label=$label scenario=$scenario op=all conns=$conns rps=$(awk -v t="$tps" -v p="$per" 'BEGIN{printf "%.1f", t*p}') tps=$tps $pct failed=${failed:-0} db_cpu_us=$(awk -v c="$db_cpu" -v t="$tps" -v p="$per" -v d="$DURATION" 'BEGIN{ if (t > 0) printf "%.1f", c*1e6/(t*p*d); else print 0 }')"
  echo "== $label $scenario | $conns connections | pgbench -M prepared -j 2 | tps $tps (x$per ops)" | tee -a "$RESULTS"
  echo "$line" | tee -a "$RESULTS"
}

scenarios() { # backend
  local backend=$1
  fresh_db "$backend"
  log "## $backend: seeding $USERS users x 10 packages ($SIZE B) into $DB_URL"
  "$BENCH" seed --database-url "$DB_URL" --users "$USERS" --size "$SIZE" 2>&1 | tail -n1 | tee -a "$RESULTS"
  local db_args=()
  if [[ "$backend" == postgres ]]; then
    db_args=(--db-comm postgres --db-name "$PG_DB")
    "$BENCH" pgbench-scripts --out "$OUT/pgbench" --size "$SIZE"
  fi
  start_server
  log "## server pid $SERVER_PID, $(grep -m1 'ready to serve' "$OUT/server.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160)"
  for conns in $CONNS; do
    for scenario in $SCENARIOS; do
      bench_run "$scenario" "$conns" "$backend" "${db_args[@]}"
      [[ "$scenario" == healthz ]] && continue
      if [[ "$backend" == postgres ]]; then
        store_ceiling "$scenario" "$conns" "$backend" "${db_args[@]}"
      else
        store_ceiling "$scenario" "$conns" "$backend"
      fi
    done
  done
  stop_server
  if [[ "$backend" == postgres ]]; then
    # The ceiling is pgbench at its best client count, whatever the server was driven at.
    for scenario in $SCENARIOS; do
      [[ "$scenario" == healthz || "$scenario" == status ]] && continue
      for conns in $PGBENCH_CONNS; do
        pgbench_ceiling "$scenario" "$conns" "$backend-pgbench"
      done
    done
  fi
  log ""
  log "## $backend ratios (server over HTTP / ceiling), ops/s"
  for conns in $CONNS; do
    for scenario in $SCENARIOS; do
      [[ "$scenario" == healthz ]] && continue
      local server store pg
      server=$(grep "^RESULT label=$backend scenario=$scenario op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
      store=$(grep "^RESULT label=$backend-ceiling scenario=$scenario op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
      if [[ "$backend" == postgres && "$scenario" != status ]]; then
        local best_conns
        read -r pg best_conns < <(grep "^RESULT label=$backend-pgbench scenario=$scenario op=all " "$RESULTS" \
          | sed -n 's/.* conns=\([0-9]*\) rps=\([0-9.]*\).*/\2 \1/p' | sort -g | tail -n1) || true
        log "RATIO $backend $scenario c=$conns server=$server store_in_process=$store pgbench_best=$pg (c=$best_conns) server/pgbench_best=$(ratio "$server" "$pg") server/store=$(ratio "$server" "$store")"
      else
        log "RATIO $backend $scenario c=$conns server=$server store_in_process=$store server/store=$(ratio "$server" "$store")"
      fi
    done
  done
}

growth() { # backend
  local backend=$1 previous=0
  fresh_db "$backend"
  local db_args=()
  [[ "$backend" == postgres ]] && db_args=(--db-comm postgres --db-name "$PG_DB")
  local conns
  conns="${CONNS%% *}"
  for n in $GROWTH_SIZES; do
    log "## $backend growth: seeding users $previous..$n x 10 packages"
    "$BENCH" seed --database-url "$DB_URL" --start "$previous" --users $((n - previous)) --size "$SIZE" \
      2>&1 | tail -n1 | tee -a "$RESULTS"
    previous=$n
    start_server
    # Each user is visited at most 3 times, so inventories never run dry and the budget of
    # 10 per minute never refuses.
    "$BENCH" run consume --url "$URL" -c "$conns" -d "$DURATION" --warmup 1 \
      --max-requests $((n * 3)) --users "$n" --writers 1000 --label "growth-$n" \
      --server-pid "$SERVER_PID" "${db_args[@]}" | tee -a "$RESULTS"
    stop_server
  done
  if [[ "$RSS_TARGETS" -gt 0 ]]; then
  log "## $backend: server RSS while $RSS_TARGETS distinct targets are requested by $RSS_CALLERS callers, every claim stage on (fresh server)"
  local saved_caller=$CALLER_BUDGET saved_pair=$PAIR_BUDGET
  CALLER_BUDGET=600 PAIR_BUDGET=3
  start_server
  sleep 1
  "$BENCH" run consume --url "$URL" -c "$conns" -d 900 --warmup 0 \
    --max-requests "$RSS_TARGETS" --users "$RSS_TARGETS" --writers "$RSS_CALLERS" --label "rss-$RSS_TARGETS" \
    --server-pid "$SERVER_PID" "${db_args[@]}" | tee -a "$RESULTS"
  stop_server
  CALLER_BUDGET=$saved_caller PAIR_BUDGET=$saved_pair
  fi
  log ""
  log "## $backend growth summary (consume, $conns connections)"
  for n in $GROWTH_SIZES; do
    grep "^RESULT label=growth-$n scenario=consume op=consume " "$RESULTS" | tail -n1 \
      | sed -n "s/.* rps=\([0-9.]*\) p50_ms=\([0-9.]*\) p99_ms=\([0-9.]*\).*/GROWTH $backend users=$n rps=\1 p50_ms=\2 p99_ms=\3/p" \
      | tee -a "$RESULTS" >&2
  done
}

# Builds BASELINE in a worktree (sharing this target directory, so only the crate itself is
# rebuilt) and keeps its server binary as target/baseline/keypackage-server.
build_baseline() {
  local rev=${BASELINE:?set BASELINE to the git revision to compare with}
  local src="$OUT/baseline-src"
  git worktree add --detach "$src" "$rev" >/dev/null 2>&1
  (cd "$src" && cargo build --release -p keypackage-server --target-dir "$OLDPWD/target" >&2)
  mkdir -p target/baseline
  cp target/release/keypackage-server target/baseline/keypackage-server
  git worktree remove --force "$src"
  # The worktree build overwrote this build's binary and its generated protobuf code (cargo
  # keeps one build-script output per package): rebuild the crate, build script included.
  cargo clean --release -p keypackage-server >&2
  cargo build --release -p keypackage-server >&2
  log "# baseline $(git rev-parse --short "$rev") against $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"
}

compare() { # backend
  local backend=$1 rounds=${ROUNDS:-2} current=$SERVER
  local scenarios=${COMPARE_SCENARIOS:-consume upload}
  build_baseline
  local conns
  for round in $(seq 1 "$rounds"); do
    for build in baseline current; do
      SERVER=$current
      [[ "$build" == baseline ]] && SERVER=target/baseline/keypackage-server
      fresh_db "$backend"
      start_server
      "$BENCH" --package-kind openmls seed --url "$URL" --users "$USERS" --connections 16 \
        2>&1 | tail -n1 | tee -a "$RESULTS"
      for conns in $CONNS; do
        for scenario in $scenarios; do
          "$BENCH" --package-kind openmls run "$scenario" --url "$URL" -c "$conns" -d "$DURATION" \
            --warmup "$WARMUP" --users "$USERS" --writers "$WRITERS" --label "$build-$round" \
            --server-pid "$SERVER_PID" | tee -a "$RESULTS"
        done
      done
      stop_server
    done
  done
  SERVER=$current
  log ""
  log "## $backend: this build over the baseline (openmls packages), ops/s summed over rounds"
  for conns in $CONNS; do
    for scenario in $scenarios; do
      local base=0 cur=0 v
      for round in $(seq 1 "$rounds"); do
        v=$(grep "^RESULT label=baseline-$round scenario=$scenario op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
        base=$(awk -v a="$base" -v b="${v:-0}" 'BEGIN{print a+b}')
        v=$(grep "^RESULT label=current-$round scenario=$scenario op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
        cur=$(awk -v a="$cur" -v b="${v:-0}" 'BEGIN{print a+b}')
      done
      log "RATIO compare $backend $scenario c=$conns baseline=$(awk -v a="$base" -v r="$rounds" 'BEGIN{printf "%.1f", a/r}') current=$(awk -v a="$cur" -v r="$rounds" 'BEGIN{printf "%.1f", a/r}') current/baseline=$(ratio "$cur" "$base")"
    done
  done
}

# The same build with every stage on and with the per-caller stages off, alternately on fresh
# databases; consumers are WRITERS distinct callers (request k by caller k mod WRITERS). Then
# one token asks for FLOOD_TARGETS distinct users with the stages on: after its caller budget
# the server refuses from memory, which the database's CPU per request shows.
stages() { # backend
  local backend=$1 rounds=${ROUNDS:-2} on=${STAGES:-600 3} flood=${FLOOD_TARGETS:-100000}
  local db_args=() conns round variant
  for round in $(seq 1 "$rounds"); do
    for variant in off on; do
      if [[ "$variant" == on ]]; then
        read -r CALLER_BUDGET PAIR_BUDGET <<<"$on"
      else
        CALLER_BUDGET=0 PAIR_BUDGET=0
      fi
      fresh_db "$backend"
      db_args=()
      [[ "$backend" == postgres ]] && db_args=(--db-comm postgres --db-name "$PG_DB")
      "$BENCH" seed --database-url "$DB_URL" --users "$USERS" --size "$SIZE" 2>&1 | tail -n1 | tee -a "$RESULTS"
      start_server
      for conns in $CONNS; do
        bench_run consume "$conns" "$variant-$round" "${db_args[@]}"
      done
      stop_server
    done
  done
  log "## $backend: one token asking for $flood distinct targets, caller limit ${on%% *}/min"
  read -r CALLER_BUDGET PAIR_BUDGET <<<"$on"
  fresh_db "$backend"
  db_args=()
  [[ "$backend" == postgres ]] && db_args=(--db-comm postgres --db-name "$PG_DB")
  start_server
  "$BENCH" run consume --url "$URL" -c "${CONNS##* }" -d "$DURATION" --warmup 0 \
    --max-requests "$flood" --users "$flood" --writers 1 --label flood \
    --server-pid "$SERVER_PID" "${db_args[@]}" | tee -a "$RESULTS"
  stop_server
  CALLER_BUDGET=0 PAIR_BUDGET=0
  log ""
  log "## $backend: consume with every stage on over the per-caller stages off, ops/s summed over rounds"
  for conns in $CONNS; do
    local off_sum=0 on_sum=0 v
    for round in $(seq 1 "$rounds"); do
      v=$(grep "^RESULT label=off-$round scenario=consume op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
      off_sum=$(awk -v a="$off_sum" -v b="${v:-0}" 'BEGIN{print a+b}')
      v=$(grep "^RESULT label=on-$round scenario=consume op=all conns=$conns " "$RESULTS" | tail -n1 | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
      on_sum=$(awk -v a="$on_sum" -v b="${v:-0}" 'BEGIN{print a+b}')
    done
    log "RATIO stages $backend consume c=$conns off=$(awk -v a="$off_sum" -v r="$rounds" 'BEGIN{printf "%.1f", a/r}') on=$(awk -v a="$on_sum" -v r="$rounds" 'BEGIN{printf "%.1f", a/r}') on/off=$(ratio "$on_sum" "$off_sum")"
  done
  grep "^RESULT label=flood scenario=consume op=consume " "$RESULTS" | tail -n1 \
    | sed -n 's/.* rps=\([0-9.]*\).* outcomes=\([^ ]*\).*/FLOOD '"$backend"' rps=\1 outcomes=\2/p' | tee -a "$RESULTS" >&2
  grep "^RESULT label=flood scenario=consume op=all " "$RESULTS" | tail -n1 | grep -o 'db_cpu_us=[0-9.]*' \
    | sed "s/^/FLOOD $backend /" | tee -a "$RESULTS" >&2 || true
}

build
machine
start_private_pg
case "$MODE" in
  sqlite | postgres) scenarios "$MODE" ;;
  both) scenarios sqlite && scenarios postgres ;;
  growth) growth "${2:-sqlite}" ;;
  compare) compare "${2:-sqlite}" ;;
  stages) stages "${2:-sqlite}" ;;
  *) echo "usage: bench/run.sh [sqlite|postgres|both] | growth [sqlite|postgres] | compare [sqlite|postgres] | stages [sqlite|postgres]" >&2; exit 2 ;;
esac
log "# load at the end: $(uptime | sed 's/.*load average/load average/')"
log "# results: $RESULTS"
if command -v python3 >/dev/null 2>&1; then
  python3 bench/charts.py "$RESULTS" "$OUT/charts" >&2 || true
fi
grep -E '^(RATIO|GROWTH|FLOOD)' "$RESULTS" >&2 || true
