#!/usr/bin/env bash
# The contract gates: the OpenAPI document the server SERVES validates as OpenAPI 3.1, and a
# property-based run over every operation (schemathesis) finds no 5xx, no response that breaks its
# schema, no undocumented status code and no undocumented content type — against a real server,
# once with auth off and once with auth on (admin token, then read token).
#
# Usage: bash tests/contract.sh        (from anywhere; needs python3 with venv, and cargo)
# Settings (environment): LTMC_CONTRACT_VENV (default target/contract-venv),
# LTMC_CONTRACT_EXAMPLES (test cases per operation and phase, default 10), LTMC_CONTRACT_SEED,
# LTMC_CONTRACT_BIN (a prebuilt ltmc binary instead of `cargo build`), LTMC_CONTRACT_REPORTS (a
# directory that keeps each run's whole output and NDJSON report; default: a temporary one).
# Leaves nothing running; exits non-zero on any failure, with one summary line at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: the versions this gate was tested with.
SCHEMATHESIS=schemathesis==4.32.5
VALIDATOR=openapi-spec-validator==0.9.0
VENV=$(realpath -m "${LTMC_CONTRACT_VENV:-target/contract-venv}")
EXAMPLES=${LTMC_CONTRACT_EXAMPLES:-10}
SEED=${LTMC_CONTRACT_SEED:-1010}
CHECKS=not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance

say() { printf '== contract: %s\n' "$*" >&2; }

# --- the tools -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || {
    echo "contract: FAILED: python3 cannot make a venv; install it with: apt-get install python3-venv" >&2
    exit 1
  }
  say "creating the venv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -m pip freeze 2>/dev/null | grep -qxiF -e "$SCHEMATHESIS" ||
   ! "$PY" -m pip freeze 2>/dev/null | grep -qxiF -e "$VALIDATOR"; then
  say "installing $SCHEMATHESIS $VALIDATOR"
  "$PY" -m pip install --quiet --disable-pip-version-check "$SCHEMATHESIS" "$VALIDATOR"
fi

# --- the server ------------------------------------------------------------------------------
if [ -n "${LTMC_CONTRACT_BIN:-}" ]; then
  LTMC=$LTMC_CONTRACT_BIN
else
  say "building the server"
  cargo build --locked --quiet --bin ltmc
  TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  LTMC="$TARGET_DIR/debug/ltmc"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ltmc-contract.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
REPORTS=$(realpath -m "${LTMC_CONTRACT_REPORTS:-$WORK}")
mkdir -p "$REPORTS"

ADMIN_TOKEN="contract-admin-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
READ_TOKEN="contract-read-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

# start NAME [ltmc flags…]: starts a server on a free port with its own SQLite file and sets
# URL_<NAME> once /healthz answers.
start() {
  local name=$1
  shift
  local log="$WORK/$name.log"
  LTMC_LOG=info LTMC_LOG_FORMAT=json "$LTMC" serve --bind 127.0.0.1:0 \
    --database-url "sqlite://$WORK/$name.db" "$@" >"$log" 2>&1 &
  PIDS+=($!)
  local addr=""
  for _ in $(seq 1 200); do
    addr=$("$PY" - "$log" <<'EOF'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if record.get("fields", {}).get("message") == "ltmc serving":
        print(record["fields"]["addr"])
        break
EOF
)
    [ -n "$addr" ] && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$log" >&2; echo "contract: FAILED: the $name server did not start" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$log" >&2; echo "contract: FAILED: the $name server did not start in 20 s" >&2; exit 1; }
  printf -v "URL_$name" 'http://%s' "$addr"
  say "$name server at http://$addr"
}

start open
start auth --admin-token "$ADMIN_TOKEN" --read-token "$READ_TOKEN"

FAILED=()

# --- gate 1: the served document is valid OpenAPI 3.1 -----------------------------------------
say "validating the served /openapi.json as OpenAPI 3.1"
if ! "$PY" - "$URL_open/openapi.json" <<'EOF'
import json, sys, urllib.request
from openapi_spec_validator import OpenAPIV31SpecValidator
document = json.load(urllib.request.urlopen(sys.argv[1]))
errors = list(OpenAPIV31SpecValidator(document).iter_errors())
for error in errors[:20]:
    print("  " + error.message[:300], file=sys.stderr)
print(f"openapi-spec-validator: {len(errors)} errors (OpenAPI {document.get('openapi')})", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
then
  FAILED+=("the served document is not valid OpenAPI 3.1")
fi

# --- gate 2: property-based run over every operation ------------------------------------------
# fuzz NAME URL PHASES [schemathesis flags…]: one schemathesis run; its output and NDJSON report
# land in $REPORTS/NAME.*. Every case of an operation runs even after one fails, so the counts are
# whole. One worker: hypothesis's lambda descriptions can trip CPython 3.11's AST parser when
# drawn from two threads at once ("AST constructor recursion depth mismatch"). The request timeout
# outlasts the longest documented long poll (`GET /v1/coordinations/{id}?wait_ms=30000`), as
# schemathesis reuses ids from earlier answers and so may wait on a real, open round.
fuzz() {
  local name=$1 url=$2 phases=$3
  shift 3
  say "schemathesis ($name): phases $phases, $EXAMPLES cases per operation and phase"
  # From the scratch directory: schemathesis keeps a cache (`.schemathesis/`) where it runs.
  if ! (cd "$WORK" && "$VENV/bin/schemathesis" run "$url/openapi.json" \
      --checks "$CHECKS" --phases "$phases" --max-examples "$EXAMPLES" \
      --seed "$SEED" --workers 1 --request-timeout 35 --no-shrink --suppress-health-check all \
      --continue-on-failure --warnings off --output-truncate true \
      --report ndjson --report-ndjson-path "$REPORTS/$name.ndjson" "$@" >"$REPORTS/$name.out" 2>&1); then
    tail -n 80 "$REPORTS/$name.out" >&2
    FAILED+=("schemathesis found failures ($name)")
  fi
  COUNTS+=("$name: $(count "$REPORTS/$name.ndjson")")
  say "${COUNTS[-1]}"
}

# count REPORT.ndjson: operations tested, cases, and failing checks by kind.
count() {
  "$PY" - "$1" <<'EOF'
import collections, json, sys
operations, cases, failures, errors = set(), 0, collections.Counter(), 0
for line in open(sys.argv[1]):
    event = json.loads(line)
    errors += "NonFatalError" in event
    finished = event.get("ScenarioFinished")
    if not finished:
        continue
    recorder = finished.get("recorder", {})
    if finished.get("status") != "skip":
        operations.add(recorder.get("label"))
    cases += len(recorder.get("cases", {}))
    for checks in recorder.get("checks", {}).values():
        for check in checks:
            if check["status"] == "failure":
                failures[check["failure_info"]["failure"]["title"]] += 1
kinds = ", ".join(f"{n} {title}" for title, n in failures.items()) or "0 failures"
print(f"{len(operations)} operations, {cases} cases, {kinds}, {errors} errors")
EOF
}
COUNTS=()

# Auth off: every phase, the coverage phase's boundary and negative cases included. Auth on: the
# admin may do everything and a read token gets its 403s; generated cases are enough there.
fuzz auth-off "$URL_open" examples,coverage,fuzzing
fuzz admin "$URL_auth" examples,fuzzing --header "Authorization: Bearer $ADMIN_TOKEN"
fuzz read "$URL_auth" examples,fuzzing --header "Authorization: Bearer $READ_TOKEN"

SUMMARY="$(IFS=';'; echo "${COUNTS[*]}")"
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "contract: OK: the served document is valid OpenAPI 3.1; schemathesis: $SUMMARY"
else
  echo "contract: FAILED: $(IFS=';'; echo "${FAILED[*]}"); schemathesis: $SUMMARY"
  exit 1
fi
