# The coding-agent CLIs Warren runs as `command` agents, installed from the npm registry at
# pinned versions, the way the runtime image installs them (see deploy/docker/Dockerfile
# and docs/coding-agents.md). Tests drive the real binaries against local model servers.
#
# Needs services.sh sourced first (say, die, WARREN_ROOT).

CODEX_VERSION=0.171.0
WARREN_CLIS_DIR="${WARREN_CLIS_DIR:-$WARREN_STATE_DIR/clis}"

# Installs npm package $2 at version $3 into $1 unless its binary $4 is there.
npm_install_pinned() {
    local dir="$1" package="$2" version="$3" bin="$4"
    [ -x "$dir/node_modules/.bin/$bin" ] && return 0
    command -v npm >/dev/null || die "npm is needed to install $package (Node.js 20+)"
    say "clis: installing $package@$version (npm) into $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent "$package@$version" \
        || die "installing $package failed"
}

# Installs @openai/codex once per version (its platform binary comes as an optional
# dependency) and exports WARREN_CODEX_BIN.
ensure_codex() {
    local dir="$WARREN_CLIS_DIR/codex-$CODEX_VERSION"
    npm_install_pinned "$dir" @openai/codex "$CODEX_VERSION" codex
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
    npm_install_pinned "$dir" @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" claude
    if ! "$dir/node_modules/.bin/claude" --version >/dev/null 2>&1; then
        (cd "$package" && node install.cjs) || die "installing Claude Code's native binary failed"
    fi
    WARREN_CLAUDE_BIN="$dir/node_modules/.bin/claude"
    "$WARREN_CLAUDE_BIN" --version >/dev/null || die "$WARREN_CLAUDE_BIN does not run"
    export WARREN_CLAUDE_BIN
}
