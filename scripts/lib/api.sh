# The admin API against its own OpenAPI document: schemathesis (PyPI, pinned) generates
# requests for every operation from the served document and checks that none gets a 5xx and
# that every answer matches the document. Against the real `warren-control-plane run`
# binary, a fresh database, and the real NATS (memory restores reach it).
#
# Needs services.sh (PostgreSQL, NATS) and deploy.sh (WARREN_TOOLS_DIR) sourced first.

SCHEMATHESIS_VERSION=4.32.5
# Examples per operation: enough to reach every branch of the input checks in well under
# a minute on two cores. `API_CHECK_EXAMPLES=100 ./scripts/test` for a longer run.
API_CHECK_EXAMPLES="${API_CHECK_EXAMPLES:-10}"

ensure_schemathesis() {
    local venv="$WARREN_TOOLS_DIR/schemathesis"
    [ -f "$venv/.v$SCHEMATHESIS_VERSION" ] && return 0
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    say "api: installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "could not make a virtualenv (python3-venv)"
    "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" \
        || die "installing schemathesis failed"
    touch "$venv/.v$SCHEMATHESIS_VERSION"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

api_check() {
    ensure_schemathesis
    say "api: building warren-control-plane"
    cargo build --locked -q -p warren-control-plane
    local bin="$WARREN_ROOT/target/debug/warren-control-plane"
    local db="warren_api_check_$$" url port metrics log pid token status=0
    url="${DATABASE_URL%/*}/$db"
    psql "$DATABASE_URL" -qc "CREATE DATABASE $db" >/dev/null
    DATABASE_URL="$url" "$bin" migrate 2>/dev/null
    token=$(DATABASE_URL="$url" "$bin" tokens issue --name api-check --role admin 2>/dev/null)
    port=$(free_port)
    metrics=$(free_port)
    log=$(mktemp)
    DATABASE_URL="$url" "$bin" --log-format text run --backend none \
        --nats-prefix "apicheck$$" --admin-listen "127.0.0.1:$port" \
        --metrics-listen "127.0.0.1:$metrics" >"$log" 2>&1 &
    pid=$!
    say "api: schemathesis against http://127.0.0.1:$port/openapi.json"
    (cd "$WARREN_STATE_DIR" && "$WARREN_TOOLS_DIR/schemathesis/bin/schemathesis" run \
        "http://127.0.0.1:$port/openapi.json" --wait-for-schema 30 \
        -H "Authorization: Bearer $token" \
        --checks not_a_server_error,response_schema_conformance \
        --max-examples "$API_CHECK_EXAMPLES" --seed 1 --no-color) || status=$?
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        say "api: the control plane's log:"; tail -50 "$log" >&2
    fi
    rm -f "$log"
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
    [ "$status" -eq 0 ] || die "the admin API does not hold to its OpenAPI document (above)"
}
