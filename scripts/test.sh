#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with Rust stable, qemu-img and Python 3.
# Installs what the tests need and the machine lacks (needs root or sudo for apt), then runs
# `cargo test --workspace`. The upload tests start a real glance-api themselves through
# scripts/glance-testenv.sh (its venv is installed on first use under target/); the remote tests
# start nginx (scripts/nginx-testenv.sh; the binary is /usr/sbin/nginx, not on a user's PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A NEED=(
    [qemu-img]=qemu-utils [genisoimage]=genisoimage [xorriso]=xorriso [sgdisk]=gdisk
    [mkfs.vfat]=dosfstools [mcopy]=mtools [curl]=curl [tar]=tar [gzip]=gzip
    [/usr/bin/time]=time [openssl]=openssl [losetup]=mount [isoinfo]=genisoimage
    [/usr/sbin/nginx]=nginx-light [python3]=python3
)
missing=()
for tool in "${!NEED[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${NEED[$tool]}")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts the packaged nginx on port 80 when it installs it; the tests start their
    # own on 127.0.0.1 (scripts/nginx-testenv.sh), so stop the system one again.
    if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
        $SUDO service nginx stop >/dev/null 2>&1 || $SUDO /usr/sbin/nginx -s stop >/dev/null 2>&1 || true
    fi
fi

exec cargo test --workspace "$@"
