#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a developer's: provisions what
# the suite needs when it is missing, then runs formatting and lint checks,
# every Rust test (unit, property, integration against the real server and
# binary), the OpenAPI validator and the short chaos soak. CI (.ci/run) calls exactly this script.
#
# Tests that need an external program fail with a clear message when it is
# missing; they are never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing $*, and no apt-get to install it: install it and re-run" >&2
        exit 1
    fi
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

log "provisioning"
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v kill >/dev/null || apt_install procps
# The TLS tests drive curl over HTTP/2 (TLS and h2c).
command -v curl >/dev/null || apt_install curl ca-certificates
# The shared-store tests start a real redis-server on a loopback port (the
# rediss:// test starts one with TLS: Debian's is built with it).
command -v redis-server >/dev/null || apt_install redis-server
# The deploy test runs real nginx with deploy/nginx.conf.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx
# The demo page is tested in headless Chromium over WebDriver.
command -v chromedriver >/dev/null || apt_install chromium chromium-driver
command -v python3 >/dev/null || apt_install python3 python3-venv
# The fuzz targets link libFuzzer, which libfuzzer-sys builds from C++.
command -v c++ >/dev/null || apt_install g++
# Python tools live in a project-local virtual environment: the OpenAPI
# validator, the official `openai` and `anthropic` SDKs (clients in the
# tests) and the schema validators for the deploy files.
VENV=.venv
PY_TOOLS="openapi-spec-validator openai anthropic kubernetes-validate check-jsonschema schemathesis"
if [ ! -x "$VENV/bin/schemathesis" ] || [ ! -x "$VENV/bin/kubernetes-validate" ] || ! "$VENV/bin/python" -c "import openai, anthropic" 2>/dev/null; then
    python3 -m venv "$VENV" || { apt_install python3-venv && python3 -m venv "$VENV"; }
    "$VENV/bin/pip" install -q --disable-pip-version-check $PY_TOOLS
fi

# The AI SDK test runs the `ai` npm package's own client code in Node
# (18 or later), pinned by tests/node/package-lock.json.
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
if [ ! -f tests/node/node_modules/ai/package.json ] || [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then
    npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

log "openapi-spec-validator openapi.yaml"
"$VENV/bin/openapi-spec-validator" openapi.yaml

log "deploy files: Kubernetes manifests and the compose file against their schemas"
for manifest in deploy/k8s/*.yaml; do
    "$VENV/bin/kubernetes-validate" --strict --quiet "$manifest"
done
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

log "cargo test --workspace"
cargo test --workspace --all-targets 2>&1 | tee target/cargo-test.log

log "fuzz: every target for 10 s on its corpus (stable toolchain, libFuzzer)"
FUZZ_SECONDS=10 FUZZ_PROFILE=quick scripts/fuzz.sh

# The binaries the steps below run. The same package and target selection
# as the test run above, so this only links what the tests did not need:
# `-p tokengate` alone resolves other features for the shared dependencies
# and rebuilt about 150 crates (2.5 to 4 minutes of a CI run).
cargo build --quiet --workspace --all-targets

log "schemathesis: every operation in openapi.yaml against the live server, with a valid token"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
secret="schemathesis-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# Unpaced, short-lived streams so that every generated request completes:
# a subscription lasts 1 s (with a heartbeat in it), which is most of this
# step's time (2 s made it 100 s instead of 63, for the same 1,435 cases).
flags=(--listen "127.0.0.1:$port" --jwt-secret "$secret" --pace-ms 0 --pace-max-ms 0
       --rate-subject-per-min 0 --rate-ip-per-min 0 --max-stream-duration 1s --heartbeat 500ms)
target/debug/tokengate "${flags[@]}" serve >/tmp/tokengate-schemathesis.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    target/debug/tokengate "${flags[@]}" healthcheck --path /healthz 2>/dev/null && break
    sleep 0.1
done
token=$(target/debug/tokengate "${flags[@]}" token --sub schemathesis --scope "stream publish" --ttl 1h)
# A fixed seed keeps CI deterministic; change it to explore further.
"$VENV/bin/schemathesis" run openapi.yaml --url "http://127.0.0.1:$port" \
    -H "Authorization: Bearer $token" --checks all --max-examples 15 --seed 20261125 \
    --request-timeout 10 --no-color
kill $server
trap - EXIT

# The short chaos soak (about 40 s on 2 cores): two debug replicas sharing
# a real redis-server, clients cutting connections at random byte offsets
# and resuming on the other replica, two SIGKILLs, a drain, a Redis restart,
# then two quiet rounds for the gauge, slot, RSS and log checks. It prints
# one summary line and exits non-zero if any check failed (which stops this
# script). The full version is in the README ("Reliability").
log "chaos soak (short): tokengate-bench soak --short"
target/debug/tokengate-bench soak --short --binary target/debug/tokengate --out target/soak-short

# One closing line for the whole run: the Rust tests' totals (every step
# above has already passed, or the script would have stopped).
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' target/cargo-test.log
