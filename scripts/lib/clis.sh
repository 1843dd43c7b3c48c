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

CLAUDE_CODE_VERSION=2.1.332

# Installs @anthropic-ai/claude-code once per version and exports WARREN_CLAUDE_BIN. Its
# native binary comes as an optional dependency; the package's postinstall copies it over
# the `claude` placeholder (npm may skip install scripts it was not told to trust, so it is
# run here when the placeholder is still there).
ensure_claude() {
    local dir="$WARREN_CLIS_DIR/claude-code-$CLAUDE_CODE_VERSION"
    local package="$dir/node_modules/@anthropic-ai/claude-code"
    if [ ! -x "$dir/node_modules/.bin/claude" ]; then
        command -v npm >/dev/null || die "npm is needed to install Claude Code (Node.js 20+)"
        say "clis: installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION (npm) into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        npm install --prefix "$dir" --no-audit --no-fund --silent \
            "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" \
            || die "installing @anthropic-ai/claude-code failed"
    fi
    if ! "$dir/node_modules/.bin/claude" --version >/dev/null 2>&1; then
        (cd "$package" && node install.cjs) || die "installing Claude Code's native binary failed"
    fi
    WARREN_CLAUDE_BIN="$dir/node_modules/.bin/claude"
    "$WARREN_CLAUDE_BIN" --version >/dev/null || die "$WARREN_CLAUDE_BIN does not run"
    export WARREN_CLAUDE_BIN
}
