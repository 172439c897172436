#!/usr/bin/env bash
# Benchmarks tokengate against the reference server (bench/, an idiomatic
# axum SSE server) on the scenarios of BENCHMARKS.md, alternating the two
# servers on each scenario (BENCH_RUNS times each, medians reported), then
# profiles scenario 6 once and counts system calls once, and writes the
# results into BENCHMARKS.md. Scenario `llm` (LLM-shaped load) alternates
# three servers instead: tokengate's `/v1/stream` and `/v1/chat/completions`
# routes and the naive proxy, all fed by the mock upstream in `llm` mode; it
# writes its own delimited section of BENCHMARKS.md (`tokengate-bench
# llm-report`), which the main report keeps.
#
# Everything runs on this machine over loopback (127.0.0.1) with bounded
# durations; each run starts a fresh server and kills it afterwards. About
# 12 minutes on 2 cores after the release build (the `llm` scenario alone:
# about 2), plus about 3 for the abuse scenarios (issue 16: loris, slowbody,
# subs, stalled; one run each), whose figures go to their own section below
# the notes marker of BENCHMARKS.md (one block per scenario, so each can be
# rerun alone).
#
# Environment (all optional):
#   BENCH_RUNS=3        runs per server and scenario
#   BENCH_OUT=target/bench   where raw JSON, logs and profiles go
#   BENCH_SCENARIOS="1 2 2r 3 4 5 6 strace llm loris slowbody subs stalled"
#                       which parts to run; a run of only llm and abuse
#                       scenarios rewrites only their sections of BENCHMARKS.md
#   BENCH_LLM_STREAMS="500 1000"   concurrent streams in scenario `llm`, one
#                       tier after the other ("100" with BENCH_QUICK=1)
#   BENCH_QUICK=1       a smoke test at a fraction of the scale (figures not
#                       comparable with the targets; BENCHMARKS.md says so)
#   BENCH_NO_REPORT=1   do not rewrite BENCHMARKS.md
#   BENCH_NO_BUILD=1    measure target/release as it is (no cargo build)
#   BENCH_PORT_OFFSET=0 added to every port the servers listen on
#   BENCH_BASELINE=path another tokengate binary (e.g. one built from an
#                       earlier commit): scenarios 1, 1b, 2, 3 and 6 then alternate
#                       tokengate with it instead of the reference, print a
#                       side-by-side summary and leave BENCHMARKS.md alone
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${BENCH_OUT:-target/bench}
RUNS=${BENCH_RUNS:-3}
SCENARIOS=${BENCH_SCENARIOS:-"1 2 2r 3 4 5 6 strace llm loris slowbody subs stalled"}
QUICK=${BENCH_QUICK:-0}
BASELINE=${BENCH_BASELINE:-}
if [[ -n $BASELINE ]]; then
  [[ -x $BASELINE ]] || { echo "BENCH_BASELINE=$BASELINE is not an executable" >&2; exit 2; }
  SCENARIOS=${BENCH_SCENARIOS:-"1 2"}
fi
START=$(date +%s)

TG=target/release/tokengate
BENCH=target/release/tokengate-bench
HOST=127.0.0.1
# BENCH_PORT_OFFSET moves every port (another checkout benchmarking on
# this machine at the same time would otherwise answer our health checks).
PORT_OFFSET=${BENCH_PORT_OFFSET:-0}
TG_PORT=$((18080 + PORT_OFFSET))
TG_PROXY_PORT=$((18081 + PORT_OFFSET))
REF_PORT=$((18090 + PORT_OFFSET))
MOCK_PORT=$((18099 + PORT_OFFSET))
CEIL_PORT=$((18091 + PORT_OFFSET))
NAIVE_PORT=$((18092 + PORT_OFFSET))
LLM_MOCK_PORT=$((18098 + PORT_OFFSET))
REDIS_PORT=$((18379 + PORT_OFFSET))

# Scale. The full numbers are the issue's; BENCH_QUICK scales them down.
if [[ $QUICK == 1 ]]; then
  S1_CONNS=100 S1_CHARS=500
  S2_CONNS=100 S2_CHARS=200 S2_PACE=5
  S2H_CONNS=50
  S3_CONNS=1000 S3_HOLD=6
  S4_SUBS=500 S4_PUBS=20
  S5_TTFD_STREAMS=50 S5_CONNS=10 S5_CHARS=500 S5_SPC=1
  S6_RATE=2000 S6_SECS=2 S6_SUBJECTS=200 S6_CONNS=100
  CG_RATE=100 CG_SECS=5
  LLM_STREAMS=${BENCH_LLM_STREAMS:-100} LLM_TOKENS=40
  LORIS_CONNS=2000 LORIS_HT=4 LORIS_BASELINE=3 LORIS_AFTER=2 LORIS_RATE=20 LORIS_WAVES=2
  SB_OBSERVE=15 SB_PER_CASE=1
  SUBS_CONNS=1000 SUBS_HOLD=6
  ST_STREAMS=5 ST_SETTLE=2 ST_AFTER_LAG=0
else
  S1_CONNS=1000 S1_CHARS=2000
  # 600 characters at 5 ms: 3 s of pacing per run, 600,000 gaps per run.
  S2_CONNS=1000 S2_CHARS=600 S2_PACE=5
  # Scenario 2h: half the streams, a load this box keeps pace with, so CPU
  # per character compares without saturation (tokengate, the reference and
  # the one-write-per-character ceiling).
  S2H_CONNS=500
  # 0 = the fd limit (raised to the hard limit) minus 1,000.
  S3_CONNS=0 S3_HOLD=11
  S4_SUBS=5000 S4_PUBS=100
  S5_TTFD_STREAMS=200 S5_CONNS=50 S5_CHARS=2000 S5_SPC=4
  S6_RATE=10000 S6_SECS=3 S6_SUBJECTS=1000 S6_CONNS=500
  CG_RATE=300 CG_SECS=10
  # 200 tokens of 4 characters at 25 ms: 5 s per run. 1,000 streams are
  # 40,000 upstream tokens/s, about what 2 cores can carry with the server,
  # the mock and the load generator on them (saturated, gaps stretch);
  # 500 streams first show the same server not falling behind.
  LLM_STREAMS=${BENCH_LLM_STREAMS:-"500 1000"} LLM_TOKENS=200
  # Abuse scenarios. Loris: 0 = the fd limit (raised to the hard limit)
  # minus 200 for the normal client and the runtime; the server's
  # header_timeout at its default, 10 s, passed explicitly; two waves on one
  # server (does the second reuse the first one's memory?).
  LORIS_CONNS=0 LORIS_HT=10 LORIS_BASELINE=8 LORIS_AFTER=4 LORIS_RATE=40 LORIS_WAVES=2
  # Slow bodies watched 30 s, three times the header timeout.
  SB_OBSERVE=30 SB_PER_CASE=3
  # 10,000 subscribers (the fd limit's 19,000 take half a minute to connect
  # per server on this machine; scenario 3 has the fd-limit figure for streams).
  SUBS_CONNS=10000 SUBS_HOLD=11
  # Measured 4 s after the last stream opened; with --max-lag 10s, again
  # 7 s later, past the slow-consumer cut.
  ST_STREAMS=20 ST_SETTLE=4 ST_AFTER_LAG=7
fi
LLM_TOKEN_MS=25 LLM_TOKEN_CHARS=4

mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
: >"$OUT/commands.txt"
: >"$OUT/logs/loadgen.log"
rm -f "$OUT"/callgrind* "$OUT"/perf* "$OUT"/strace* "$OUT"/profile-note.txt "$OUT"/llm-*

# A fresh HS256 secret (38 bytes) for this run; both sides get it from the
# environment so it never appears in a command line or in BENCHMARKS.md.
SECRET="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export TOKENGATE_JWT_SECRET=$SECRET BENCH_JWT_SECRET=$SECRET

# Scenario `llm` logs its commands apart (its own section lists them).
log_cmd() { printf '%s\n' "$*" >>"${CMDS_FILE:-$OUT/commands.txt}"; }
# The abuse scenarios keep their own results, commands and run line per
# scenario in $ABUSE (for `tokengate-bench abuse-report`).
ABUSE=$OUT/abuse
mkdir -p "$ABUSE"
ABUSE_RAN=()
note() { printf '\n== %s\n' "$*" >&2; }

if [[ ${BENCH_NO_BUILD:-0} == 1 ]]; then
  # Measure the binaries already in target/release (e.g. one built earlier
  # and kept, while the sources moved on).
  echo "== BENCH_NO_BUILD=1: using target/release as it is" >&2
  log_cmd "# BENCH_NO_BUILD=1: target/release/tokengate and tokengate-bench as built before"
else
  echo "== building (release)" >&2
  log_cmd "cargo build --release -p tokengate"
  cargo build --release -p tokengate
  log_cmd "cargo build --release -p tokengate-bench"
  cargo build --release -p tokengate-bench
fi

SRV_PID=
MOCK_PID=
REDIS_PID=
cleanup() {
  [[ -n $SRV_PID ]] && kill -KILL "$SRV_PID" 2>/dev/null || true
  [[ -n $MOCK_PID ]] && kill -KILL "$MOCK_PID" 2>/dev/null || true
  [[ -n $REDIS_PID ]] && kill -KILL "$REDIS_PID" 2>/dev/null || true
}
trap cleanup EXIT

# Running and not a zombie (an exited child stays one until waited for,
# and `kill -0` succeeds on it).
alive() { # pid
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

wait_ready() { # port pid
  local i
  for i in $(seq 1 100); do
    if curl -sf -o /dev/null --max-time 1 "http://$HOST:$1/healthz"; then
      # The answer must come from our server, not from another process
      # that already had the port (ours then exits at once: address in use).
      sleep 0.2
      if ! alive "$2"; then
        echo "server on port $1 exited; is the port taken? (BENCH_PORT_OFFSET moves all ports; see $OUT/logs)" >&2
        return 1
      fi
      return 0
    fi
    if ! kill -0 "$2" 2>/dev/null; then echo "server on port $1 died; see $OUT/logs" >&2; return 1; fi
    sleep 0.1
  done
  echo "server on port $1 not ready after 10 s" >&2
  return 1
}

# tokengate's flags for every scenario: no pacing by default, limits out of
# the way (scenario 6 turns the rate limiters back on), 5 s heartbeats.
TG_BASE=(--pace-ms 0 --max-streams 50000 --max-streams-per-subject 100000 --max-connections 60000
  --max-prompt-bytes 1000000 --heartbeat 5s --shutdown-grace 1s)
TG_NO_RATE=(--rate-subject-per-min 0 --rate-ip-per-min 0)
# Scenario 6: both limiters on and consulted on every open, set high enough
# (per subject 100/s, per IP 100,000/s) that none is refused.
TG_RATE_ON=(--rate-subject-per-min 6000 --rate-subject-burst 100 --rate-ip-per-min 6000000 --rate-ip-burst 100000)

start_tokengate() { # port log-name [extra flags...]
  local port=$1 name=$2
  shift 2
  [[ ${LOG_CMDS:-0} == 1 ]] && log_cmd "${RUST_LOG:+RUST_LOG=$RUST_LOG }$TG --listen $HOST:$port ${TG_BASE[*]} $* &   # TOKENGATE_JWT_SECRET in the environment"
  $TG --listen "$HOST:$port" "${TG_BASE[@]}" "$@" >"$OUT/logs/$name.log" 2>&1 &
  SRV_PID=$!
  wait_ready "$port" "$SRV_PID"
}

start_reference() { # log-name
  [[ ${LOG_CMDS:-0} == 1 ]] && log_cmd "$BENCH reference --listen $HOST:$REF_PORT --heartbeat-secs 5 &"
  $BENCH reference --listen "$HOST:$REF_PORT" --heartbeat-secs 5 >"$OUT/logs/$1.log" 2>&1 &
  SRV_PID=$!
  wait_ready "$REF_PORT" "$SRV_PID"
}

start_ceiling() { # log-name
  [[ ${LOG_CMDS:-0} == 1 ]] && log_cmd "$BENCH ceiling --listen $HOST:$CEIL_PORT &"
  $BENCH ceiling --listen "$HOST:$CEIL_PORT" >"$OUT/logs/$1.log" 2>&1 &
  SRV_PID=$!
  wait_ready "$CEIL_PORT" "$SRV_PID"
}

start_naive() { # log-name
  [[ ${LOG_CMDS:-0} == 1 ]] && log_cmd "$BENCH naive-proxy --listen $HOST:$NAIVE_PORT --upstream http://$HOST:$LLM_MOCK_PORT/v1 --model gpt-4o-mini &"
  $BENCH naive-proxy --listen "$HOST:$NAIVE_PORT" --upstream "http://$HOST:$LLM_MOCK_PORT/v1" --model gpt-4o-mini >"$OUT/logs/$1.log" 2>&1 &
  SRV_PID=$!
  wait_ready "$NAIVE_PORT" "$SRV_PID"
}

stop_server() {
  if [[ -n $SRV_PID ]]; then
    kill -KILL "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
  fi
}

loadgen() { # scenario server run mode [args...]
  local scenario=$1 server=$2 run=$3
  shift 3
  [[ ${LOG_CMDS:-0} == 1 ]] && log_cmd "$BENCH loadgen $* --server-pid \$PID --tag scenario=$scenario --tag server=$server --tag run=N"
  $BENCH loadgen "$@" --server-pid "$SRV_PID" --tag "scenario=$scenario" --tag "server=$server" --tag "run=$run" \
    >>"$RESULTS" 2> >(tee -a "$OUT/logs/loadgen.log" >&2) || echo "loadgen $scenario/$server/$run failed" >&2
}

# One run of a scenario on one server.
run_one() { # scenario server run
  local s=$1 server=$2 run=$3
  # "baseline" is tokengate from another binary, tagged apart.
  local TAG=$server TG=$TG
  if [[ $server == baseline ]]; then server=tokengate TG=$BASELINE; fi
  local TGA=(--addr "$HOST:$TG_PORT" --target tokengate) REFA=(--addr "$HOST:$REF_PORT" --target reference)
  case "$s/$server" in
  s1/tokengate)
    start_tokengate $TG_PORT "s1-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s1 "$TAG" "$run" stream "${TGA[@]}" --conns $S1_CONNS --chars $S1_CHARS ;;
  s1/reference)
    start_reference "s1-reference-$run"
    loadgen s1 reference "$run" stream "${REFA[@]}" --conns $S1_CONNS --chars $S1_CHARS ;;
  s1b/tokengate)
    start_tokengate $TG_PORT "s1b-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s1b "$TAG" "$run" stream "${TGA[@]}" --conns $S1_CONNS --chars $S1_CHARS --threads 2 ;;
  s1b/reference)
    start_reference "s1b-reference-$run"
    loadgen s1b reference "$run" stream "${REFA[@]}" --conns $S1_CONNS --chars $S1_CHARS --threads 2 ;;
  s2/tokengate)
    start_tokengate $TG_PORT "s2-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s2 "$TAG" "$run" stream "${TGA[@]}" --conns $S2_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2/reference)
    start_reference "s2-reference-$run"
    loadgen s2 reference "$run" stream "${REFA[@]}" --conns $S2_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2h/tokengate)
    start_tokengate $TG_PORT "s2h-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s2h "$TAG" "$run" stream "${TGA[@]}" --conns $S2H_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2h/reference)
    start_reference "s2h-reference-$run"
    loadgen s2h reference "$run" stream "${REFA[@]}" --conns $S2H_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2h/ceiling)
    start_ceiling "s2h-ceiling-$run"
    loadgen s2h ceiling "$run" stream --addr "$HOST:$CEIL_PORT" --target reference --conns $S2H_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2r/tokengate)
    start_tokengate $TG_PORT "s2r-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s2r tokengate "$run" stream "${TGA[@]}" --conns $S2H_CONNS --chars $S2_CHARS --pace-ms $S2_PACE ;;
  s2r/tokengate-redis)
    # The same server on the shared store; redis-server's CPU and commands
    # over the run are read around it and written as a row of their own.
    redis-cli -p $REDIS_PORT flushall >/dev/null
    redis-cli -p $REDIS_PORT config resetstat >/dev/null
    local r0 r1 c1
    r0=$(awk '{ print $14 + $15 }' "/proc/$REDIS_PID/stat")
    start_tokengate $TG_PORT "s2r-redis-$run" "${TG_NO_RATE[@]}" --redis-url "redis://$HOST:$REDIS_PORT"
    loadgen s2r tokengate-redis "$run" stream "${TGA[@]}" --conns $S2H_CONNS --chars $S2_CHARS --pace-ms $S2_PACE
    r1=$(awk '{ print $14 + $15 }' "/proc/$REDIS_PID/stat")
    # What the finished streams' logs occupy in Redis (kept for stream_ttl).
    local mem=0 k
    for k in $(redis-cli -p $REDIS_PORT --scan --pattern 'tg:s:*'); do
      mem=$((mem + $(redis-cli -p $REDIS_PORT memory usage "$k" samples 0)))
    done
    c1=$(redis-cli -p $REDIS_PORT info commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\).*/\1 \2/p' |
      python3 -c 'import json,sys; print(json.dumps(dict((k, int(v)) for k, v in (l.split() for l in sys.stdin))))')
    printf '{"tags":{"scenario":"s2r-redis","server":"redis-server","run":"%s"},"redis_cpu_s":%s,"redis_commands":%s,"streams":%s,"redis_log_bytes":%s}\n' \
      "$run" "$(python3 -c "print(($r1 - $r0) / $(getconf CLK_TCK))")" "$c1" "$S2H_CONNS" "$mem" >>"$RESULTS" ;;
  s3/tokengate)
    # A 60 s pace (allowed by --pace-max-ms) keeps every stream open and
    # quiet but for heartbeats.
    start_tokengate $TG_PORT "s3-tokengate-$run" "${TG_NO_RATE[@]}" --pace-max-ms 600000
    loadgen s3 "$TAG" "$run" idle "${TGA[@]}" --conns $S3_CONNS --hold-secs $S3_HOLD --heartbeat-secs 5 --pace-ms 60000 ;;
  s3/reference)
    start_reference "s3-reference-$run"
    loadgen s3 reference "$run" idle "${REFA[@]}" --conns $S3_CONNS --hold-secs $S3_HOLD --heartbeat-secs 5 --pace-ms 60000 ;;
  s4/tokengate)
    start_tokengate $TG_PORT "s4-tokengate-$run" "${TG_NO_RATE[@]}"
    loadgen s4 tokengate "$run" fanout "${TGA[@]}" --subscribers $S4_SUBS --publishes $S4_PUBS --interval-ms 100 ;;
  s4/reference)
    start_reference "s4-reference-$run"
    loadgen s4 reference "$run" fanout "${REFA[@]}" --subscribers $S4_SUBS --publishes $S4_PUBS --interval-ms 100 ;;
  s5/tokengate)
    start_tokengate $TG_PROXY_PORT "s5-tokengate-$run" "${TG_NO_RATE[@]}" \
      --upstream-url "http://$HOST:$MOCK_PORT/v1" --upstream-model m
    local P=(--addr "$HOST:$TG_PROXY_PORT" --target tokengate --generator openai)
    loadgen s5ttfd tokengate "$run" proxy "${P[@]}" --conns 1 --streams-per-conn $S5_TTFD_STREAMS --chars 50
    loadgen s5tput tokengate "$run" proxy "${P[@]}" --conns $S5_CONNS --streams-per-conn $S5_SPC --chars $S5_CHARS ;;
  s5/direct)
    # The "server" measured is the mock itself.
    SRV_PID=$MOCK_PID
    local D=(--addr "$HOST:$MOCK_PORT" --target openai)
    loadgen s5ttfd direct "$run" proxy "${D[@]}" --conns 1 --streams-per-conn $S5_TTFD_STREAMS --chars 50
    loadgen s5tput direct "$run" proxy "${D[@]}" --conns $S5_CONNS --streams-per-conn $S5_SPC --chars $S5_CHARS
    SRV_PID= ;;
  s6/tokengate)
    start_tokengate $TG_PORT "s6-tokengate-$run" "${TG_RATE_ON[@]}"
    loadgen s6 "$TAG" "$run" opens "${TGA[@]}" --rate $S6_RATE --duration-secs $S6_SECS --subjects $S6_SUBJECTS --conns $S6_CONNS ;;
  s6/reference)
    start_reference "s6-reference-$run"
    loadgen s6 reference "$run" opens "${REFA[@]}" --rate $S6_RATE --duration-secs $S6_SECS --subjects $S6_SUBJECTS --conns $S6_CONNS ;;
  llm/tokengate-stream | llm/tokengate-chat)
    start_tokengate $TG_PROXY_PORT "llm-$server-$run" "${TG_NO_RATE[@]}" \
      --upstream-url "http://$HOST:$LLM_MOCK_PORT/v1" --upstream-model gpt-4o-mini
    local route=native
    [[ $server == tokengate-chat ]] && route=chat
    # The upstream is the generator `openai` (`--upstream-url`): named in
    # `generator=` on /v1/stream and as the `model` on /v1/chat/completions.
    loadgen llm "$server" "$run" llm --addr "$HOST:$TG_PROXY_PORT" --target tokengate --route $route --generator openai "${LLM_ARGS[@]}" ;;
  llm/naive)
    start_naive "llm-naive-$run"
    loadgen llm naive "$run" llm --addr "$HOST:$NAIVE_PORT" --target reference --route native "${LLM_ARGS[@]}" ;;
  esac
  stop_server
}

# Alternate the servers, swapping who goes first on every other run.
alternate() { # scenario first second
  local s=$1 a=$2 b=$3 run
  for run in $(seq 1 "$RUNS"); do
    if [[ $run == 1 ]]; then LOG_CMDS=1; else LOG_CMDS=0; fi
    if ((run % 2 == 1)); then
      run_one "$s" "$a" "$run"
      run_one "$s" "$b" "$run"
      LOG_CMDS=0
    else
      run_one "$s" "$b" "$run"
      run_one "$s" "$a" "$run"
    fi
  done
  LOG_CMDS=0
}

# Three servers, each first, second and third in turn.
rotate3() { # scenario a b c
  local s=$1 run i
  local servers=("$2" "$3" "$4")
  for run in $(seq 1 "$RUNS"); do
    for i in 0 1 2; do
      if [[ $run == 1 ]]; then LOG_CMDS=1; else LOG_CMDS=0; fi
      run_one "$s" "${servers[$(((run - 1 + i) % 3))]}" "$run"
    done
  done
  LOG_CMDS=0
}

# Starts an abuse scenario: clears its files, writes its run line.
abuse_begin() { # scenario "server flags beyond TG_BASE" "what"
  local s=$1 commit
  : >"$ABUSE/$s.jsonl"
  : >"$ABUSE/$s.cmds"
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock bench 2>/dev/null) ]]; then commit="$commit (with uncommitted changes)"; fi
  {
    echo "DATE=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "COMMIT=$commit"
    echo "LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)"
    if [[ $QUICK == 1 ]]; then
      echo "SCALE=**BENCH_QUICK=1 smoke run at a fraction of the scale: not the issue's figures**"
    else
      echo "SCALE=full scale"
    fi
    if [[ -n $2 ]]; then echo "SERVER=$2"; fi
    if [[ -n ${3:-} ]]; then echo "WHAT=$3"; fi
  } >"$ABUSE/$s.meta"
  ABUSE_RAN+=("$s")
}

abuse_tokengate() { # scenario log-name [extra flags...]
  local s=$1 name=$2
  shift 2
  printf '%s\n' "$TG --listen $HOST:$TG_PORT ${TG_BASE[*]} $* &   # TOKENGATE_JWT_SECRET in the environment" >>"$ABUSE/$s.cmds"
  $TG --listen "$HOST:$TG_PORT" "${TG_BASE[@]}" "$@" >"$OUT/logs/$name.log" 2>&1 &
  SRV_PID=$!
  wait_ready "$TG_PORT" "$SRV_PID"
}

abuse_loadgen() { # scenario server mode [args...]
  local s=$1 server=$2
  shift 2
  printf '%s\n' "$BENCH loadgen $* --server-pid \$PID --tag scenario=$s --tag server=$server" >>"$ABUSE/$s.cmds"
  $BENCH loadgen "$@" --server-pid "$SRV_PID" --tag "scenario=$s" --tag "server=$server" \
    >>"$ABUSE/$s.jsonl" 2> >(tee -a "$OUT/logs/loadgen.log" >&2) || echo "loadgen $s/$server failed" >&2
}

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
MAIN_RAN=0
LLM_RAN=0
# Who tokengate is compared with in scenarios 1, 1b, 2, 3 and 6.
OTHER=reference
[[ -n $BASELINE ]] && OTHER=baseline

for s in $SCENARIOS; do
  case $s in 2r | llm | loris | slowbody | subs | stalled) ;; *) MAIN_RAN=1 ;; esac
  case $s in
  1)
    note "scenario 1: unpaced throughput"; log_cmd "# scenario 1"; alternate s1 tokengate $OTHER
    # The same with a 2-thread load generator: with one thread the client
    # itself can be the bottleneck (it is for the reference's many small
    # writes), with two it competes with the server for the 2 cores.
    note "scenario 1b: unpaced throughput, 2-thread load generator"; log_cmd "# scenario 1b"; alternate s1b tokengate $OTHER ;;
  2)
    note "scenario 2: paced"; log_cmd "# scenario 2"; alternate s2 tokengate $OTHER
    note "scenario 2h: paced, 500 streams, with the one-write-per-character ceiling"; log_cmd "# scenario 2h"
    if [[ -n $BASELINE ]]; then rotate3 s2h tokengate baseline ceiling; else rotate3 s2h tokengate reference ceiling; fi ;;
  2r)
    # Scenario 2 at 500 streams on the memory store and on Redis (one
    # replica), alternating; redis-server stays up for all runs, flushed
    # before each.
    note "scenario 2r: paced, 500 streams, memory store against Redis"
    command -v redis-server >/dev/null || { echo "scenario 2r needs redis-server (apt-get install redis-server)" >&2; exit 1; }
    log_cmd "# scenario 2r (redis-server stays up for all runs, FLUSHALL before each Redis run)"
    log_cmd "redis-server --port $REDIS_PORT --bind $HOST --save '' --appendonly no &"
    redis-server --port $REDIS_PORT --bind $HOST --save '' --appendonly no >"$OUT/logs/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 1 50); do redis-cli -p $REDIS_PORT ping >/dev/null 2>&1 && break; sleep 0.1; done
    alternate s2r tokengate tokengate-redis
    kill -KILL "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
    # The summary: CPU per delivered character of tokengate plus
    # redis-server against the memory store's, and commands per stream.
    python3 - "$RESULTS" >"$OUT/s2r-summary.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def of(server):
    return sorted((r for r in rows if r.get("tags", {}).get("scenario") == "s2r" and r["tags"].get("server") == server),
                  key=lambda r: r["tags"]["run"])
mem, red = of("tokengate"), of("tokengate-redis")
rs = sorted((r for r in rows if r.get("tags", {}).get("scenario") == "s2r-redis"), key=lambda r: r["tags"]["run"])
med = statistics.median
def chars(r):
    return r["chars_delivered"]
mem_cpu = [r["server_cpu_s"] * 1e6 / chars(r) for r in mem]
tg_cpu = [r["server_cpu_s"] * 1e6 / chars(r) for r in red]
redis_cpu = [x["redis_cpu_s"] * 1e6 / chars(r) for r, x in zip(red, rs)]
both = [a + b for a, b in zip(tg_cpu, redis_cpu)]
cmds = [sum(x["redis_commands"].values()) / x["streams"] for x in rs]
print("| figure (medians of %d runs each) | memory store | Redis, one replica | ratio |" % len(mem))
print("|---|---:|---:|---:|")
print("| delivered chars/s | %.0f | %.0f | %.2fx |" % (med([r["chars_per_s"] for r in mem]), med([r["chars_per_s"] for r in red]),
      med([r["chars_per_s"] for r in red]) / med([r["chars_per_s"] for r in mem])))
print("| tokengate CPU µs per char | %.2f | %.2f | %.2fx |" % (med(mem_cpu), med(tg_cpu), med(tg_cpu) / med(mem_cpu)))
print("| redis-server CPU µs per char | - | %.2f | - |" % med(redis_cpu))
print("| **tokengate + redis-server CPU µs per char** | %.2f | %.2f | **%.2fx** |" % (med(mem_cpu), med(both), med(both) / med(mem_cpu)))
print("| inter-delta gap p50 / p99, ms | %.2f / %.1f | %.2f / %.1f | - |" % (
      med([r["gap_ms"]["p50"] for r in mem]), med([r["gap_ms"]["p99"] for r in mem]),
      med([r["gap_ms"]["p50"] for r in red]), med([r["gap_ms"]["p99"] for r in red])))
print("| Redis commands per stream | - | %.1f | - |" % med(cmds))
print("| Redis memory per finished stream's log, bytes (`MEMORY USAGE`) | - | %.0f | - |" % med([x["redis_log_bytes"] / x["streams"] for x in rs]))
last = rs[-1]["redis_commands"]
top = sorted(last.items(), key=lambda kv: -kv[1])[:8]
print()
print("Redis commands per stream by command (last run): " + ", ".join("`%s` %.1f" % (k, v / rs[-1]["streams"]) for k, v in top) + ".")
PY
    cat "$OUT/s2r-summary.md" >&2 ;;
  3) note "scenario 3: idle"; log_cmd "# scenario 3"; alternate s3 tokengate $OTHER ;;
  4) note "scenario 4: fan-out"; log_cmd "# scenario 4"; alternate s4 tokengate reference ;;
  5)
    note "scenario 5: proxy overhead"
    log_cmd "# scenario 5 (mock upstream stays up for all runs)"
    log_cmd "$BENCH mock-upstream --listen $HOST:$MOCK_PORT &"
    $BENCH mock-upstream --listen "$HOST:$MOCK_PORT" >"$OUT/logs/mock.log" 2>&1 &
    MOCK_PID=$!
    wait_ready $MOCK_PORT $MOCK_PID
    alternate s5 tokengate direct
    kill -KILL "$MOCK_PID" 2>/dev/null || true
    wait "$MOCK_PID" 2>/dev/null || true
    MOCK_PID= ;;
  6)
    note "scenario 6: stream opens with auth and limits"
    log_cmd "# scenario 6"
    alternate s6 tokengate $OTHER
    [[ -n $BASELINE ]] && continue

    # Diagnostic (once): the same load with tokengate's logging at warn.
    note "scenario 6 diagnostic: RUST_LOG=warn"
    log_cmd "# scenario 6 diagnostic, once: RUST_LOG=warn (for tokengate)"
    LOG_CMDS=1
    export RUST_LOG=warn
    start_tokengate $TG_PORT "s6-quiet" "${TG_RATE_ON[@]}"
    unset RUST_LOG
    loadgen s6quiet tokengate 1 opens --addr "$HOST:$TG_PORT" --target tokengate --rate $S6_RATE --duration-secs $S6_SECS --subjects $S6_SUBJECTS --conns $S6_CONNS
    stop_server
    LOG_CMDS=0

    # Profile (once). perf is used when it can count instructions;
    # otherwise callgrind on a short run at a lower rate (callgrind runs the
    # server ~50x slower; the shares are what count).
    note "scenario 6 profile"
    if perf stat -e instructions true >/dev/null 2>&1 && ! perf stat -e instructions true 2>&1 | grep -q "not supported"; then
      PERF_COUNTS=1
    else
      PERF_COUNTS=0
    fi
    if command -v valgrind >/dev/null && [[ $PERF_COUNTS == 0 ]]; then
      log_cmd "# scenario 6 profile, once: perf cannot count instructions here, so callgrind"
      log_cmd "valgrind --tool=callgrind --callgrind-out-file=$OUT/callgrind.out $TG --listen $HOST:$TG_PORT ${TG_BASE[*]} ${TG_RATE_ON[*]} &"
      valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
        $TG --listen "$HOST:$TG_PORT" "${TG_BASE[@]}" "${TG_RATE_ON[@]}" >"$OUT/logs/s6-callgrind.log" 2>&1 &
      SRV_PID=$!
      wait_ready $TG_PORT $SRV_PID
      LOG_CMDS=1
      loadgen callgrind tokengate 1 opens --addr "$HOST:$TG_PORT" --target tokengate --rate $CG_RATE --duration-secs $CG_SECS --subjects $S6_SUBJECTS --conns 100 --max-secs 60
      LOG_CMDS=0
      kill -TERM "$SRV_PID"
      wait "$SRV_PID" 2>/dev/null || true
      SRV_PID=
      log_cmd "callgrind_annotate --inclusive=yes $OUT/callgrind.out; callgrind_annotate $OUT/callgrind.out"
      callgrind_annotate --inclusive=yes --threshold=100 "$OUT/callgrind.out" >"$OUT/callgrind-inclusive.txt" 2>/dev/null || true
      callgrind_annotate --threshold=100 "$OUT/callgrind.out" >"$OUT/callgrind-self.txt" 2>/dev/null || true
      cat >"$OUT/profile-note.txt" <<EOF
\`perf stat -e instructions\` does not work on this machine (no hardware counters in the VM), so the
profile is callgrind's instruction counts (\`valgrind --tool=callgrind\`, release binary, symbols
without debug info: inlined functions count in their caller). tokengate ran with the scenario's flags
(rate limiters on) and served $((CG_RATE * CG_SECS)) stream opens at $CG_RATE/s over 100 kept-alive
connections across $S6_SUBJECTS subjects (the full $S6_RATE/s is impossible under callgrind's slowdown;
the shares are per open and do not depend on the rate), then got SIGTERM. The counts cover the whole
process, start-up and shutdown included (the table shows the largest start-up item, the limiters'
construction with its clock calibration, so it can be told apart);
zeroing the counters after a warm-up was tried and mis-attributes self costs to the frames that were
live at that moment. Logging was at its default (info, text).
EOF
    fi
    if perf record -e cpu-clock -o /dev/null true >/dev/null 2>&1; then
      # Cross-check at the full rate: sampled CPU time (kernel included).
      LOG_CMDS=1
      start_tokengate $TG_PORT "s6-perf" "${TG_RATE_ON[@]}"
      log_cmd "perf record -e cpu-clock -F 1999 -p \$PID -o $OUT/perf.data -- sleep $((S6_SECS + 1)) &"
      perf record -e cpu-clock -F 1999 -p "$SRV_PID" -o "$OUT/perf.data" -- sleep $((S6_SECS + 1)) >/dev/null 2>&1 &
      PERF_PID=$!
      sleep 0.3
      loadgen perf tokengate 1 opens --addr "$HOST:$TG_PORT" --target tokengate --rate $S6_RATE --duration-secs $S6_SECS --subjects $S6_SUBJECTS --conns $S6_CONNS
      wait "$PERF_PID" 2>/dev/null || true
      LOG_CMDS=0
      stop_server
      perf report -i "$OUT/perf.data" --stdio --no-children --sort sym 2>/dev/null | grep -E '^ +[0-9.]+%' >"$OUT/perf-report.txt" || true
      echo "tokengate at the full $S6_RATE opens/s for ${S6_SECS} s under \`perf record -e cpu-clock -F 1999 -p PID\` (software clock sampling; no call graphs, so these are self times; kernel time, mostly the loopback TCP stack, is included as its own line)." >"$OUT/perf-note.txt"
    fi ;;
  strace)
    if command -v strace >/dev/null; then
      note "system calls (strace -c -f), paced streams, once per server"
      log_cmd "# system calls, once per server: strace -c -f -p \$PID during a scaled-down scenario 2"
      for server in tokengate reference; do
        LOG_CMDS=1
        if [[ $server == tokengate ]]; then
          start_tokengate $TG_PORT "strace-tokengate" "${TG_NO_RATE[@]}"
          A=(--addr "$HOST:$TG_PORT" --target tokengate)
        else
          start_reference "strace-reference"
          A=(--addr "$HOST:$REF_PORT" --target reference)
        fi
        log_cmd "strace -c -f -p \$PID -o $OUT/strace-$server.txt &"
        strace -c -f -p "$SRV_PID" -o "$OUT/strace-$server.txt" 2>/dev/null &
        STRACE_PID=$!
        sleep 1
        loadgen strace "$server" 1 stream "${A[@]}" --conns 200 --chars 300 --pace-ms 5
        kill -INT "$STRACE_PID" 2>/dev/null || true
        wait "$STRACE_PID" 2>/dev/null || true
        LOG_CMDS=0
        stop_server
      done
      echo "Counted with \`strace -c -f -p PID\` attached to the server while 200 streams of 300 characters at 5 ms ran (a scaled-down scenario 2). strace slows every system call down, so the server batches differently than untraced; the counts per character are indicative." >"$OUT/strace-note.txt"
    fi ;;
  llm)
    note "scenario llm: LLM-shaped load ($LLM_STREAMS streams; $LLM_TOKENS tokens of $LLM_TOKEN_CHARS chars every $LLM_TOKEN_MS ms)"
    LLM_START=$(date +%s) LLM_LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
    CMDS_FILE=$OUT/llm-commands.txt
    : >"$CMDS_FILE"
    log_cmd "# the mock upstream stays up for all runs"
    log_cmd "$BENCH mock-upstream --mode llm --listen $HOST:$LLM_MOCK_PORT --token-ms $LLM_TOKEN_MS --tokens $LLM_TOKENS --token-chars $LLM_TOKEN_CHARS --threads 1 &"
    # One worker thread: the mock's job is to be cheap, and the servers
    # need the cores.
    $BENCH mock-upstream --mode llm --listen "$HOST:$LLM_MOCK_PORT" --token-ms $LLM_TOKEN_MS --tokens $LLM_TOKENS \
      --token-chars $LLM_TOKEN_CHARS --threads 1 >"$OUT/logs/llm-mock.log" 2>&1 &
    MOCK_PID=$!
    wait_ready $LLM_MOCK_PORT $MOCK_PID
    log_cmd "# the servers alternate, each run a fresh one; \$MOCK is the mock's PID, \$PID the server's"
    for n in $LLM_STREAMS; do
      LLM_ARGS=(--streams "$n" --tokens "$LLM_TOKENS" --token-chars "$LLM_TOKEN_CHARS" --upstream-pid "$MOCK_PID" --max-secs 90)
      log_cmd "# $n streams"
      rotate3 llm tokengate-stream tokengate-chat naive
    done

    # Profile (once): tokengate's /v1/stream route under the last tier's
    # load, sampled by perf (software clock, no call graphs: self time).
    if perf record -e cpu-clock -o /dev/null true >/dev/null 2>&1; then
      note "scenario llm: perf profile of tokengate /v1/stream"
      LOG_CMDS=1
      log_cmd "# profile, once"
      start_tokengate $TG_PROXY_PORT "llm-perf" "${TG_NO_RATE[@]}" --upstream-url "http://$HOST:$LLM_MOCK_PORT/v1" --upstream-model gpt-4o-mini
      PERF_SECS=$((LLM_TOKENS * LLM_TOKEN_MS / 1000 + 2))
      log_cmd "perf record -e cpu-clock -F 999 -p \$PID -o $OUT/llm-perf.data -- sleep $PERF_SECS &"
      perf record -e cpu-clock -F 999 -p "$SRV_PID" -o "$OUT/llm-perf.data" -- sleep $PERF_SECS >/dev/null 2>&1 &
      PERF_PID=$!
      sleep 0.3
      loadgen llmperf tokengate-stream 1 llm --addr "$HOST:$TG_PROXY_PORT" --target tokengate --route native --generator openai "${LLM_ARGS[@]}"
      wait "$PERF_PID" 2>/dev/null || true
      LOG_CMDS=0
      stop_server
      perf report -i "$OUT/llm-perf.data" --stdio --no-children --sort sym 2>/dev/null | grep -E '^ +[0-9.]+%' >"$OUT/llm-perf-report.txt" || true
      perf report -i "$OUT/llm-perf.data" --stdio --no-children --sort dso 2>/dev/null | grep -E '^ +[0-9.]+%' >"$OUT/llm-perf-dso.txt" || true
      {
        echo "tokengate's \`/v1/stream\` route under the scenario's load (${LLM_ARGS[1]} streams), once, under \`perf record -e cpu-clock -F 999 -p PID\` for the whole run (software clock sampling; no call graphs, so these are self times; kernel time, mostly the loopback TCP stack, is included as its own lines). By binary:"
        echo
        sed -E 's/^ +([0-9.]+%) +(.*)$/- \2: \1/' "$OUT/llm-perf-dso.txt" | head -6
        echo
        echo "Top symbols:"
      } >"$OUT/llm-perf-note.txt"
    fi
    kill -KILL "$MOCK_PID" 2>/dev/null || true
    wait "$MOCK_PID" 2>/dev/null || true
    sed -i "s/--upstream-pid $MOCK_PID /--upstream-pid \$MOCK /" "$CMDS_FILE"
    MOCK_PID=
    unset CMDS_FILE
    LLM_RAN=1
    LLM_ELAPSED=$(($(date +%s) - LLM_START))
    cat >"$OUT/llm-meta.txt" <<EOF
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo " (with uncommitted changes in src/ or Cargo.*)")$([[ -n $(git status --porcelain -- bench scripts 2>/dev/null) ]] && echo " (with uncommitted changes in bench/ or scripts/)")
LOADAVG=$LLM_LOADAVG
NOFILE=$(ulimit -Sn)/$(ulimit -Hn) (the load generator, the mock and the naive proxy raise the soft limit to the hard one)
ELAPSED=$((LLM_ELAPSED / 60)) min $((LLM_ELAPSED % 60)) s
RUNS=$RUNS
TOKEN_MS=$LLM_TOKEN_MS
SCALE=$([[ $QUICK == 1 ]] && echo "**BENCH_QUICK=1 smoke run ($LLM_STREAMS streams of $LLM_TOKENS tokens): not comparable with the target.**" || echo "${LLM_STREAMS// / and then } streams of $LLM_TOKENS tokens (full scale: the issue's 1,000; 2,000 would fit the fd limit, but 1,000 already saturate the 2 cores)")
EOF
    ;;
  loris)
    note "abuse: slow loris (connections that never send a request head)"
    abuse_begin loris "--header-timeout ${LORIS_HT}s ${TG_NO_RATE[*]}"
    abuse_tokengate loris loris-tokengate "${TG_NO_RATE[@]}" --header-timeout "${LORIS_HT}s"
    abuse_loadgen loris tokengate loris --addr "$HOST:$TG_PORT" --target tokengate --loris $LORIS_CONNS \
      --header-timeout-secs $LORIS_HT --rate $LORIS_RATE --baseline-secs $LORIS_BASELINE --after-secs $LORIS_AFTER \
      --waves $LORIS_WAVES --connect-concurrency 256
    stop_server ;;
  slowbody)
    note "abuse: request heads and bodies one byte at a time"
    # body_timeout at 15 s (default 30 s) so that it falls inside the watch.
    abuse_begin slowbody "${TG_NO_RATE[*]} --body-timeout 15s (header_timeout at its default, 10 s)"
    abuse_tokengate slowbody slowbody-tokengate "${TG_NO_RATE[@]}" --body-timeout 15s
    abuse_loadgen slowbody tokengate slowbody --addr "$HOST:$TG_PORT" --target tokengate \
      --observe-secs $SB_OBSERVE --per-case $SB_PER_CASE --interval-ms 500 --header-timeout-secs 10
    stop_server ;;
  subs)
    note "abuse: idle channel subscribers"
    abuse_begin subs "${TG_NO_RATE[*]}" "Heartbeats every 5 s on both servers; the reference gets the same requests (it ignores the tokens)."
    abuse_tokengate subs subs-tokengate "${TG_NO_RATE[@]}"
    abuse_loadgen subs tokengate idle --addr "$HOST:$TG_PORT" --target tokengate --kind channel \
      --conns $SUBS_CONNS --hold-secs $SUBS_HOLD --heartbeat-secs 5
    stop_server
    printf '%s\n' "$BENCH reference --listen $HOST:$REF_PORT --heartbeat-secs 5 &" >>"$ABUSE/subs.cmds"
    start_reference subs-reference
    abuse_loadgen subs reference idle --addr "$HOST:$REF_PORT" --target reference --kind channel \
      --conns $SUBS_CONNS --hold-secs $SUBS_HOLD --heartbeat-secs 5
    stop_server ;;
  stalled)
    note "abuse: stalled readers of large echo prompts"
    # Bodies up to 2 MB (a 1,000,000-character prompt is a 1,000,044-byte
    # body); a 10 s max_lag so the slow-consumer cut is seen in the run.
    ST_FLAGS=("${TG_NO_RATE[@]}" --max-body-bytes 2000000 --max-lag 10s)
    abuse_begin stalled "${ST_FLAGS[*]}" "The last column's server also has \`--stream-max-events 1000\` (default 20,000 events kept per stream for resume)."
    for chars in 10000 100000 1000000; do
      abuse_tokengate stalled "stalled-$chars" "${ST_FLAGS[@]}"
      abuse_loadgen stalled tokengate stalled --addr "$HOST:$TG_PORT" --target tokengate --streams $ST_STREAMS \
        --chars $chars --settle-secs $ST_SETTLE --after-lag-secs $ST_AFTER_LAG
      stop_server
    done
    abuse_tokengate stalled "stalled-1000000-log1000" "${ST_FLAGS[@]}" --stream-max-events 1000
    abuse_loadgen stalled tokengate stalled --addr "$HOST:$TG_PORT" --target tokengate --streams $ST_STREAMS \
      --chars 1000000 --settle-secs $ST_SETTLE --after-lag-secs $ST_AFTER_LAG --tag variant=stream_max_events=1000
    stop_server ;;
  esac
done

ELAPSED=$(($(date +%s) - START))
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then COMMIT="$COMMIT (with uncommitted changes in src/ or Cargo.*)"; fi
SCALE="Full scale: the issue's numbers (1,000 streams of 2,000 characters; 1,000 paced streams; the fd limit's worth of idle streams; 5,000 subscribers x 100 publishes; 1 and 50 proxied streams; 10,000 opens/s) except where a scenario line says otherwise."
[[ $QUICK == 1 ]] && SCALE="**BENCH_QUICK=1 smoke run at a fraction of the scale: these figures are not comparable with the targets.**"
cat >"$OUT/meta.txt" <<EOF
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
NPROC=$(nproc)
CPU=$CPU_MODEL
MEM=$MEM
KERNEL=$(uname -sr)
NOFILE=$(ulimit -Sn)/$(ulimit -Hn) (the load generator and the reference raise the soft limit to the hard one)
RUSTC=$(rustc --version)
COMMIT=$COMMIT
LOADAVG=$LOADAVG
ELAPSED=$((ELAPSED / 60)) min $((ELAPSED % 60)) s (build included)
RUNS=$RUNS
SCALE=$SCALE
S1B=Scenario 1 again with \`--threads 2\` for the load generator (a multi-thread runtime with 2 workers), so that the client is not capped at one core; it then competes with the server for both cores.
S1=$S1_CONNS concurrent GET streams of $S1_CHARS generated characters each (about 1 in 4 CJK), unpaced (\`pace_ms\` omitted, server default 0), every stream's reassembled text compared with what was sent. chars/s = characters delivered / time from the first request to the last \`done\` (all connections are opened before the clock starts).
S2=$S2_CONNS concurrent streams of $S2_CHARS characters at \`pace_ms=$S2_PACE\` ($((S2_CHARS * S2_PACE / 1000)) s nominal per stream instead of longer runs, to keep the whole script near 10 minutes). Gaps are between consecutive deltas of one stream, as the client reads them. CPU per character = server utime+stime / characters delivered.
S2H=Scenario 2 at $S2H_CONNS streams, a load this machine sustains, with a third server: the one-write-per-character ceiling (\`tokengate-bench ceiling\`: one tokio task per connection, one interval timer and one \`write\` per character, no HTTP framing). It is the floor for one write per character here.
S2R=Scenario 2 at $S2H_CONNS streams, tokengate on its memory store against tokengate with \`--redis-url\` (one replica, a fresh redis-server flushed before each run). CPU per character with Redis counts redis-server's CPU over the run too; commands per stream come from \`INFO commandstats\`.
S3=As many streams as the fd limit allows (hard limit minus 1,000 for the other descriptors; the server has the same limit), each a \`/v1/stream\` at \`pace_ms=60000\` (tokengate started with \`--pace-max-ms 600000\`) so that after its first delta it only gets heartbeats (5 s on both servers), held ${S3_HOLD} s. RSS per stream = (VmRSS while held - VmRSS of the fresh server) / open streams. Heartbeats flowing = every stream got at least floor(hold/5 s) - 1 heartbeats during the hold.
S4=$S4_SUBS subscribers on one channel, then $S4_PUBS publishes 100 ms apart over a kept-alive connection; each delivery's latency = when the subscriber read it - when the publisher sent the POST (same process, same monotonic clock).
S5=A mock OpenAI-compatible upstream (\`tokengate-bench mock-upstream\`, one character per \`chat.completion.chunk\`, unpaced) served directly (\`direct\`) or through tokengate's \`openai\` generator (\`--upstream-url http://$HOST:$MOCK_PORT/v1 --upstream-model m\`). Time to first delta: 1 connection running $S5_TTFD_STREAMS streams of 50 characters one after the other. Throughput: $S5_CONNS concurrent connections each running $S5_SPC streams of $S5_CHARS characters. Server CPU for \`direct\` is the mock's; for tokengate it is tokengate's alone (the mock works in both; in the tokengate runs the mock's CPU shows as \`other_cpu_s\`).
S6=Open-loop schedule of $S6_RATE stream opens/s for $S6_SECS s over $S6_CONNS kept-alive connections, each open with the token of the next of $S6_SUBJECTS subjects (round robin), 8-character echo streams; both rate limiters on in tokengate (per subject 6,000/min, per IP 6,000,000/min: consulted, never refusing). Latency is from the scheduled start to \`done\`. Profiled once, see below.
EOF

if [[ -n $BASELINE ]]; then
  # Medians per scenario and binary, and this build's ratio to the baseline.
  python3 - "$RESULTS" "$BASELINE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = [("chars_per_s", "chars/s"), ("server_cpu_us_per_char", "server CPU us/char"),
        ("gap_p50", "gap p50 ms"), ("gap_p99", "gap p99 ms"),
        ("server_rss_bytes_per_char_retained", "RSS B/retained char"),
        ("server_rss_bytes_per_char_retained_settled", "RSS B/retained char, settled"),
        ("server_rss_kib_per_stream", "RSS KiB/open stream"), ("server_cpu_us_per_open", "server CPU us/open"),
        ("server_rss_kib_peak", "peak RSS KiB")]
def value(r, k):
    return r.get("gap_ms", {}).get(k[4:]) if k.startswith("gap_") else r.get(k)
print(f"side by side with {sys.argv[2]} (medians of alternating runs; n = runs per binary)")
for s in sorted({r["tags"]["scenario"] for r in rows if "tags" in r}):
    for k, label in keys:
        med = {}
        for server in ("tokengate", "baseline", "ceiling"):
            vals = [value(r, k) for r in rows if r.get("tags", {}).get("scenario") == s and r["tags"].get("server") == server]
            vals = [v for v in vals if isinstance(v, (int, float))]
            med[server] = statistics.median(vals) if vals else None
        t, b, c = med["tokengate"], med["baseline"], med["ceiling"]
        if t is None and b is None:
            continue
        ratio = f"{t / b:.3f}" if t is not None and b else "-"
        ceiling = f"  ceiling {c}  ratio to it {t / c:.3f}" if t is not None and c else ""
        n = sum(1 for r in rows if r.get("tags", {}).get("scenario") == s and r["tags"].get("server") == "tokengate")
        print(f"{s:5} {label:20} this build {t}  baseline {b}  ratio {ratio}{ceiling}  (n = {n})")
PY
elif [[ ${BENCH_NO_REPORT:-0} != 1 ]]; then
  # The main report only when one of its scenarios ran (it rewrites every
  # table above its notes marker); the llm and abuse sections are their own.
  if [[ $MAIN_RAN == 1 ]]; then
    log_cmd "$BENCH report --results $RESULTS --dir $OUT --out BENCHMARKS.md"
    $BENCH report --results "$RESULTS" --dir "$OUT" --out "$ROOT/BENCHMARKS.md"
  fi
  if [[ $LLM_RAN == 1 ]]; then
    printf '%s\n' "$BENCH llm-report --results $RESULTS --dir $OUT --out BENCHMARKS.md" >>"$OUT/llm-commands.txt"
    $BENCH llm-report --results "$RESULTS" --dir "$OUT" --out "$ROOT/BENCHMARKS.md"
  fi
  # Then the abuse scenarios' blocks, below the notes marker (which the
  # main report keeps).
  if ((${#ABUSE_RAN[@]})); then
    $BENCH abuse-report --dir "$ABUSE" --out "$ROOT/BENCHMARKS.md" --scenarios "${ABUSE_RAN[@]}"
  fi
fi
echo "done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s; raw results in $RESULTS" >&2
