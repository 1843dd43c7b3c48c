# The coding-agent CLIs Warren runs as `command` agents, installed from the npm registry at
# pinned versions, the way the runtime image installs them (see deploy/docker/Dockerfile
# and docs/coding-agents.md). Tests drive the real binaries against local model servers.
#
# Needs services.sh sourced first (say, die, WARREN_ROOT).

CODEX_VERSION=0.171.0
WARREN_CLIS_DIR="${WARREN_CLIS_DIR:-$WARREN_STATE_DIR/clis}"

# Installs @openai/codex once per version (its platform binary comes as an optional
# dependency) and exports WARREN_CODEX_BIN.
ensure_codex() {
    local dir="$WARREN_CLIS_DIR/codex-$CODEX_VERSION"
    if [ ! -x "$dir/node_modules/.bin/codex" ]; then
        command -v npm >/dev/null || die "npm is needed to install the Codex CLI (Node.js 20+)"
        say "clis: installing @openai/codex@$CODEX_VERSION (npm) into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        npm install --prefix "$dir" --no-audit --no-fund --silent \
            "@openai/codex@$CODEX_VERSION" || die "installing @openai/codex failed"
    fi
    WARREN_CODEX_BIN="$dir/node_modules/.bin/codex"
    "$WARREN_CODEX_BIN" --version >/dev/null || die "$WARREN_CODEX_BIN does not run"
    export WARREN_CODEX_BIN
}
