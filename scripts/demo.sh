#!/usr/bin/env bash
# Shows the main job on generated images: inspect, check (a good and a hostile image),
# convert to a compressed qcow2 and a streamOptimized VMDK, compare, checksum.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "demo.sh: qemu-img is required (apt-get install qemu-utils)" >&2; exit 1; }
cargo build -q --release -p glimpse
# The binary cargo just built: under CARGO_TARGET_DIR when that is set.
target=${CARGO_TARGET_DIR:-$PWD/target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
G=$target/release/glimpse
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT

echo "== a 64 MiB disk with data, text and holes, as qcow2"
python3 - "$D/disk.raw" <<'PY'
import random, sys
random.seed(7)
with open(sys.argv[1], "wb") as f:
    for i in range(64):
        k = i % 5
        f.write(random.randbytes(1 << 20) if k == 0 else
                (b"glimpse demo text line\n" * 50000)[: 1 << 20] if k == 1 else bytes(1 << 20))
PY
qemu-img convert -f raw -O qcow2 "$D/disk.raw" "$D/disk.qcow2"
qemu-img create -q -f qcow2 -b /etc/passwd -F raw "$D/hostile.qcow2" 64M

set -x
"$G" info "$D/disk.qcow2"
"$G" check --expect-format qcow2 "$D/disk.qcow2"
"$G" check --expect-format qcow2 "$D/hostile.qcow2" || echo "exit $? (rejected, as it should be)"
"$G" check --expect-format raw "$D/disk.qcow2" || echo "exit $? (a qcow2 declared raw is rejected)"
"$G" convert -p -c -O qcow2 -o compression_type=zstd "$D/disk.qcow2" "$D/out.qcow2"
"$G" convert -O vmdk -o subformat=streamOptimized "$D/disk.qcow2" - > "$D/out.vmdk"
"$G" compare "$D/out.qcow2" "$D/out.vmdk"
qemu-img compare "$D/disk.raw" "$D/out.vmdk"
"$G" checksum "$D/disk.qcow2"
"$G" checksum --content "$D/disk.raw" "$D/out.qcow2" "$D/out.vmdk"
