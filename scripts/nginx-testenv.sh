#!/usr/bin/env bash
# nginx-testenv.sh - a throw-away nginx serving a directory on 127.0.0.1, for glimpse's
# remote-image tests (range requests, ETag, Last-Modified). TEST ONLY.
#
#   nginx-testenv.sh start DIR ROOT [--owner-pid PID]
#       write DIR/nginx.conf (own prefix, logs, temp paths and pid file under DIR), serve ROOT
#       on 127.0.0.1 at a free port (never 80), wait until it answers; prints
#       NGINX_PID=... NGINX_URL=http://127.0.0.1:PORT
#       With --owner-pid, a watcher stops the server once PID has exited.
#   nginx-testenv.sh stop DIR      stop the server started from DIR (that PID only)
#   nginx-testenv.sh status DIR    print NGINX_PID/NGINX_URL if running, exit 1 otherwise
#
# Environment: NGINX (default /usr/sbin/nginx; Debian package nginx-light).
set -euo pipefail

NGINX=${NGINX:-/usr/sbin/nginx}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=testenv-watcher.sh
. "$HERE/testenv-watcher.sh"

die() { echo "nginx-testenv: $*" >&2; exit 1; }
usage() { sed -n '2,14p' "$SELF" >&2; exit 2; }

[ $# -ge 2 ] || usage
CMD=$1
case "$CMD" in start|stop|status) ;; *) usage ;; esac
mkdir -p "$2"
D=$(cd "$2" && pwd)
shift 2
ROOT=""
OWNER=""
if [ "$CMD" = start ]; then
    [ $# -ge 1 ] || usage
    ROOT=$(cd "$1" && pwd) || die "no such directory: $1"
    shift
fi
while [ $# -gt 0 ]; do
    case "$1" in
        --owner-pid) [ $# -ge 2 ] || usage; OWNER=$2; shift 2 ;;
        *)           usage ;;
    esac
done
[ -z "$OWNER" ] || [ "$OWNER" -gt 1 ] 2>/dev/null || die "--owner-pid needs a process id"

PIDFILE=$D/run/nginx.pid
mkdir -p "$D/run" "$D/log" "$D/tmp"

if [ -z "${NGINX_TESTENV_LOCKED:-}" ]; then
    exec 9>"$D/run/lock"
    flock 9
fi

running_pid() {
    [ -s "$PIDFILE" ] || return 1
    local pid; pid=$(tr -dc 0-9 < "$PIDFILE")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # a recycled PID belongs to some other program: ours names our conf
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$D/nginx.conf" || return 1
    echo "$pid"
}

do_stop() {
    local pid
    if ! pid=$(running_pid); then rm -f "$PIDFILE"; echo "nginx not running ($D)"; return 0; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    echo "nginx stopped (pid $pid)"
}

start_watcher() { start_owner_watcher "$D" "$SELF" NGINX_TESTENV_LOCKED "$OWNER"; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

do_start() {
    local pid port
    [ -x "$NGINX" ] || die "$NGINX not found (Debian: apt-get install nginx-light)"
    if pid=$(running_pid); then
        port=$(cat "$D/run/port")
        [ "$(cat "$D/run/root")" = "$ROOT" ] || die "already serving $(cat "$D/run/root"); stop it first"
        [ -z "$OWNER" ] || start_watcher
        echo "NGINX_PID=$pid"; echo "NGINX_URL=http://127.0.0.1:$port"; return 0
    fi
    port=$(free_port)
    [ "$port" != 80 ] || die "refusing port 80"
    cat > "$D/nginx.conf" <<EOF
worker_processes 1;
pid $PIDFILE;
error_log $D/log/error.log warn;
daemon on;
events { worker_connections 256; }
http {
    access_log $D/log/access.log;
    client_body_temp_path $D/tmp/body;
    proxy_temp_path $D/tmp/proxy;
    fastcgi_temp_path $D/tmp/fastcgi;
    uwsgi_temp_path $D/tmp/uwsgi;
    scgi_temp_path $D/tmp/scgi;
    sendfile on;
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$port;
        root $ROOT;
        location / { }
    }
}
EOF
    echo "$port" > "$D/run/port"
    echo "$ROOT" > "$D/run/root"
    "$NGINX" -p "$D" -c "$D/nginx.conf" -e "$D/log/error.log" </dev/null >/dev/null 2>>"$D/log/error.log" 9>&- \
        || { tail -5 "$D/log/error.log" >&2; die "nginx did not start"; }
    for _ in $(seq 1 100); do
        if pid=$(running_pid) && curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/"; then
            [ -z "$OWNER" ] || start_watcher
            echo "NGINX_PID=$pid"; echo "NGINX_URL=http://127.0.0.1:$port"; return 0
        fi
        sleep 0.1
    done
    tail -5 "$D/log/error.log" >&2
    die "nginx did not answer on 127.0.0.1:$port"
}

case "$CMD" in
    start)  do_start ;;
    stop)   do_stop ;;
    status) pid=$(running_pid) || exit 1
            echo "NGINX_PID=$pid"; echo "NGINX_URL=http://127.0.0.1:$(cat "$D/run/port")" ;;
esac
