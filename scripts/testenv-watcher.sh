# Sourced by glance-testenv.sh and nginx-testenv.sh: the owner watcher that stops a test
# service when the process that started it (the test binary) is gone.

# start_owner_watcher DIR SELF LOCKVAR OWNER: record OWNER in DIR/run/owner and, unless a watcher
# already runs, start one. It runs detached from the caller's stdio (a test that reads the
# script's output must see EOF), takes the DIR lock before it decides, and follows
# run/owner, which a later `start --owner-pid` may point at a new owner. When the owner is
# gone it runs `SELF stop DIR` with LOCKVAR=1, still holding the lock (fd 9 stays open
# across exec).
start_owner_watcher() {
    local d=$1 self=$2 lockvar=$3 owner=$4
    echo "$owner" > "$d/run/owner"
    if [ -s "$d/run/watcher.pid" ] && kill -0 "$(cat "$d/run/watcher.pid")" 2>/dev/null; then
        return 0
    fi
    TESTENV_DIR=$d TESTENV_SELF=$self TESTENV_LOCKVAR=$lockvar setsid bash -c '
        D=$TESTENV_DIR
        while :; do
            sleep 0.5
            exec 9>"$D/run/lock"; flock 9
            owner=$(cat "$D/run/owner" 2>/dev/null || true)
            if [ -z "$owner" ] || ! kill -0 "$owner" 2>/dev/null; then
                rm -f "$D/run/owner" "$D/run/watcher.pid"
                export "$TESTENV_LOCKVAR=1"
                exec "$TESTENV_SELF" stop "$D"
            fi
            if [ "$(cat "$D/run/watcher.pid" 2>/dev/null)" != "$$" ]; then exit 0; fi
            exec 9>&-
        done' < /dev/null >> "$d/log/watcher.log" 2>&1 9>&- 8>&- &
    echo $! > "$d/run/watcher.pid"
}
