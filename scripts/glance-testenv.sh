#!/usr/bin/env bash
# glance-testenv.sh - a throw-away OpenStack Glance (Images API v2) for glimpse's upload tests.
# TEST ONLY: no Keystone (a tiny identity filter stands in), sqlite, the `file` store,
# glance-direct import, listening on 127.0.0.1 only, served by uWSGI (pyuwsgi).
#
#   glance-testenv.sh start DIR [PORT] [--owner-pid PID]
#       create a venv and install glance (once, pinned by glance-constraints.txt), write the
#       config, db_sync (once), start, wait until healthy; prints GLANCE_PID=... GLANCE_URL=...
#       With --owner-pid, a watcher stops the server once PID has exited (tests pass their own
#       PID so that nothing is left running after them).
#   glance-testenv.sh stop   DIR    stop the server started from DIR (that PID only)
#   glance-testenv.sh status DIR    print GLANCE_PID/GLANCE_URL if running, exit 1 otherwise
#   glance-testenv.sh reset  DIR    stop, then delete DB, images, staging, logs (keeps the venv)
#
# Environment:
#   PYTHON                 python3 (>= 3.11)
#   GLANCE_VENV            where the venv lives (default DIR/venv; share it between DIRs)
#   PIP_CONSTRAINT         constraints file for pip (default: glance-constraints.txt beside
#                          this script)
#   GLANCE_WORKERS         uWSGI worker processes (2)
#   GLANCE_START_TIMEOUT   seconds to wait for /healthcheck (90)
#   GLANCE_IMAGE_SIZE_CAP  Glance's image_size_cap in bytes (Glance's default: 1 TiB)
set -euo pipefail

GLANCE_VERSION=33.0.0
PYUWSGI_VERSION=2.0.30.post1
PYTHON=${PYTHON:-python3}
WORKERS=${GLANCE_WORKERS:-2}
START_TIMEOUT=${GLANCE_START_TIMEOUT:-90}
SIZE_CAP=${GLANCE_IMAGE_SIZE_CAP:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=testenv-watcher.sh
. "$HERE/testenv-watcher.sh"
export PIP_CONSTRAINT=${PIP_CONSTRAINT:-$HERE/glance-constraints.txt}

die() { echo "glance-testenv: $*" >&2; exit 1; }
usage() { sed -n '2,24p' "$SELF" >&2; exit 2; }

[ $# -ge 2 ] || usage
CMD=$1
case "$CMD" in start|stop|status|reset) ;; *) usage ;; esac
mkdir -p "$2"
D=$(cd "$2" && pwd)
shift 2
PORT_ARG=""
OWNER=""
while [ $# -gt 0 ]; do
    case "$1" in
        --owner-pid) [ $# -ge 2 ] || usage; OWNER=$2; shift 2 ;;
        [0-9]*)      PORT_ARG=$1; shift ;;
        *)           usage ;;
    esac
done
[ -z "$OWNER" ] || [ "$OWNER" -gt 1 ] 2>/dev/null || die "--owner-pid needs a process id"

VENV=${GLANCE_VENV:-$D/venv}
mkdir -p "$VENV"
VENV=$(cd "$VENV" && pwd)
PIDFILE=$D/run/glance-api.pid
LOG=$D/log/glance-api.log
mkdir -p "$D/run" "$D/log"

# One lock per DIR: start, stop and the owner watcher decide under it, so a watcher never
# stops a server that a new owner has just claimed.
if [ -z "${GLANCE_TESTENV_LOCKED:-}" ]; then
    exec 9>"$D/run/lock"
    flock 9
fi

probe() {  # probe URL -> HTTP status, 000 when nothing answers
    curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true
}

running_pid() {  # prints the uWSGI master PID when the server started from $D is alive
    [ -s "$PIDFILE" ] || return 1
    local pid; pid=$(tr -dc 0-9 < "$PIDFILE")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # a recycled PID belongs to some other program: only ours has our ini on its command line
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$D/etc/glance-uwsgi.ini" || return 1
    echo "$pid"
}

do_stop() {
    local pid
    if ! pid=$(running_pid); then rm -f "$PIDFILE"; echo "glance-api not running ($D)"; return 0; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        # the master was started through setsid, so it leads its own process group
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    echo "glance-api stopped (pid $pid)"
}

install_venv() {
    local marker=$VENV/.installed-glance-$GLANCE_VERSION-pyuwsgi-$PYUWSGI_VERSION
    [ -f "$marker" ] && return 0
    # several DIRs may share one venv: install it once, under its own lock
    exec 8>"$VENV/.install-lock"
    flock 8
    if [ ! -f "$marker" ]; then
        command -v "$PYTHON" >/dev/null || die "$PYTHON not found (glance $GLANCE_VERSION needs Python >= 3.11)"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$PYTHON is older than 3.11 (glance $GLANCE_VERSION needs >= 3.11)"
        [ -f "$PIP_CONSTRAINT" ] || die "constraints file $PIP_CONSTRAINT is missing"
        [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" \
            || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
        echo "glance-testenv: installing glance $GLANCE_VERSION into $VENV (once)" >&2
        "$VENV/bin/pip" install -q --disable-pip-version-check \
            "glance==$GLANCE_VERSION" "pyuwsgi==$PYUWSGI_VERSION" >&2 \
            || die "pip install of glance $GLANCE_VERSION failed"
        touch "$marker"
    fi
    flock -u 8
    exec 8>&-
}

write_config() {
    local port=$1 cap=""
    [ -z "$SIZE_CAP" ] || cap="image_size_cap = $SIZE_CAP"
    mkdir -p "$D/etc" "$D/lib" "$D/images" "$D/staging" "$D/tasks" "$D/cache" "$D/locks"

    cat > "$D/etc/glance-api.conf" <<EOF
[DEFAULT]
debug = false
use_stderr = true
bind_host = 127.0.0.1
enabled_backends = fs:file
enabled_import_methods = [glance-direct]
worker_self_reference_url = http://127.0.0.1:$port
image_cache_dir = $D/cache
$cap

[database]
# timeout: writers wait for the sqlite lock instead of failing with "database is locked"
connection = sqlite:///$D/glance.sqlite?timeout=60

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $D/images/

[os_glance_staging_store]
filesystem_store_datadir = $D/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $D/tasks/

[paste_deploy]
flavor = testauth
config_file = $D/etc/glance-api-paste.ini

[oslo_concurrency]
lock_path = $D/locks
EOF

    cat > "$D/etc/glance-api-paste.ini" <<EOF
[composite:glance-api-testauth]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
testauth = cors http_proxy_to_wsgi versionnegotiation osprofiler testidentity context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = $D/run/healthcheck_disable

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

# TEST ONLY: stands in for keystonemiddleware's auth_token filter
[filter:testidentity]
paste.filter_factory = glimpse_test_identity:filter_factory
user_id = test-user
project_id = test-project
roles = admin,member,reader

[filter:osprofiler]
paste.filter_factory = osprofiler.web:WsgiMiddleware.factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = glance
oslo_config_program = glance-api

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
EOF

    cat > "$D/lib/glimpse_test_identity.py" <<'EOF'
"""TEST ONLY - never deploy. Stands in for keystonemiddleware: sets the identity
headers that glance's ContextMiddleware trusts (a confirmed user with a project
and roles), unless the request already carries them. Any X-Auth-Token is
accepted unchecked, which is what lets the tests pass an arbitrary token."""


def filter_factory(global_conf, **local_conf):
    identity = {
        'HTTP_X_IDENTITY_STATUS': 'Confirmed',
        'HTTP_X_USER_ID': local_conf.get('user_id', 'test-user'),
        'HTTP_X_PROJECT_ID': local_conf.get('project_id', 'test-project'),
        'HTTP_X_ROLES': local_conf.get('roles', 'admin,member,reader'),
    }

    def make(app):
        def middleware(environ, start_response):
            for key, value in identity.items():
                environ.setdefault(key, value)
            return app(environ, start_response)
        return middleware
    return make
EOF

    cat > "$D/lib/glimpse_test_sqlite.py" <<'EOF'
"""TEST ONLY. SQLAlchemy starts SQLite transactions with a deferred BEGIN, so two
concurrent read-then-write transactions fail with "database is locked" instead of
waiting. BEGIN IMMEDIATE takes the write lock at the start, and the busy timeout
(?timeout=60 on the connection URL) then makes writers queue.
oslo.db itself disables pysqlite's implicit BEGIN and emits a plain BEGIN unless
conn.info has "in_transaction", which it clears on commit and rollback: setting
that same marker here makes oslo.db skip its own BEGIN for this transaction."""
from sqlalchemy import event
from sqlalchemy.engine import Engine


@event.listens_for(Engine, "begin")
def _begin_immediate(conn):
    if conn.dialect.name == "sqlite" and "in_transaction" not in conn.info:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.info["in_transaction"] = True
EOF

    cat > "$D/etc/glance-uwsgi.ini" <<EOF
[uwsgi]
http-socket = 127.0.0.1:$port
import = glimpse_test_sqlite
module = glance.wsgi.api:application
pidfile = $PIDFILE
vacuum = true
need-app = true
master = true
processes = $WORKERS
enable-threads = true
lazy-apps = true
die-on-term = true
exit-on-reload = false
hook-master-start = unix_signal:15 gracefully_kill_them_all
thunder-lock = true
buffer-size = 65535
add-header = Connection: close
http-raw-body = true
http-chunked-input = true
http-auto-chunked = true
http-keepalive = false
socket-timeout = 60
EOF
    echo "$port" > "$D/run/port"
}

start_watcher() { start_owner_watcher "$D" "$SELF" GLANCE_TESTENV_LOCKED "$OWNER"; }

do_start() {
    local port=$PORT_ARG pid
    if pid=$(running_pid); then
        local p; p=$(cat "$D/run/port")
        [ -z "$port" ] || [ "$port" = "$p" ] || die "already running on port $p (pid $pid); stop it first"
        [ -z "$OWNER" ] || start_watcher
        echo "GLANCE_PID=$pid"; echo "GLANCE_URL=http://127.0.0.1:$p"; return 0
    fi
    command -v curl >/dev/null || die "curl is required"
    install_venv
    if [ -z "$port" ]; then
        port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    [ "$(probe "http://127.0.0.1:$port/")" = 000 ] || die "port $port is already in use"
    write_config "$port"
    if [ ! -f "$D/glance.sqlite" ] || [ ! -f "$D/run/db-synced-$GLANCE_VERSION" ]; then
        "$VENV/bin/glance-manage" --config-file "$D/etc/glance-api.conf" db_sync \
            > "$D/log/db_sync.log" 2>&1 || { tail -20 "$D/log/db_sync.log" >&2; die "db_sync failed"; }
        # WAL lets readers go on while one writer holds the lock
        "$VENV/bin/python" -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute("PRAGMA journal_mode=WAL")' \
            "$D/glance.sqlite"
        touch "$D/run/db-synced-$GLANCE_VERSION"
    fi

    rm -f "$PIDFILE"
    local t0; t0=$(date +%s.%N)
    ( cd "$D" && PYTHONPATH="$D/lib" OS_GLANCE_CONFIG_DIR="$D/etc" \
        exec setsid "$VENV/bin/uwsgi" --ini "$D/etc/glance-uwsgi.ini" \
        < /dev/null >> "$LOG" 2>&1 9>&- ) &
    local bgpid=$!
    [ -z "$OWNER" ] || start_watcher
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    while :; do
        if [ "$(probe "http://127.0.0.1:$port/healthcheck")" = 200 ] && pid=$(running_pid); then
            break
        fi
        if ! kill -0 "$bgpid" 2>/dev/null && ! running_pid >/dev/null; then
            tail -30 "$LOG" >&2; die "glance-api exited during start-up (log: $LOG)"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { tail -30 "$LOG" >&2; do_stop >&2; die "not ready after ${START_TIMEOUT}s"; }
        sleep 0.1
    done
    echo "glance-api ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')s, log: $LOG" >&2
    echo "GLANCE_PID=$pid"
    echo "GLANCE_URL=http://127.0.0.1:$port"
}

case "$CMD" in
    start)  do_start ;;
    stop)   do_stop ;;
    status) pid=$(running_pid) || { echo "not running"; exit 1; }
            echo "GLANCE_PID=$pid"; echo "GLANCE_URL=http://127.0.0.1:$(cat "$D/run/port")" ;;
    reset)  do_stop
            rm -rf "$D"/glance.sqlite* "$D/images" "$D/staging" "$D/tasks" "$D/cache" "$D/log" \
                   "$D/run/port" "$D"/run/db-synced-* ;;
    *)      usage ;;
esac
