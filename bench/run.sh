#!/usr/bin/env bash
# Times glimpse against its peers side by side with hyperfine, on generated images of 1, 2
# and 4 GiB with mixed content (bench/gen-mixed.py). Results: bench/results/*.json and a
# summary (medians with min and max, and the ratio of medians, glimpse / peer) in
# bench/results/summary.md.
#
#   bench/run.sh [GROUP...]    groups: info check checksum compare convert compress
#                              (default: all)
#
# convert: the uncompressed conversions at SIZES (default "1g 4g"), each in the page cache
# ("hot": one warm-up run, then RUNS) and after dropping it before every run ("cold": needs
# root to write /proc/sys/vm/drop_caches; skipped with a message otherwise). reflink (not in
# the default set): raw -> raw and raw -> qcow2 in REFLINK_DIR, a directory on XFS or btrfs,
# where glimpse's copy_file_range becomes a reflink. compress: the compressing conversions.
# CASES="raw-raw raw-qcow2" limits convert to those cases, MODES="hot" (or "cold") to one mode.
# interleaved (not in the default set): raw -> raw and raw -> qcow2 at SIZES in the page cache,
# ROUNDS (6) hyperfine runs of RUNS_PER_ROUND (5) with the tools' order swapped every round.
# As root in a VM with free page reporting, the script turns reporting off for its own run and
# restores it at exit (see below); PAGE_REPORTING=keep leaves it on.
#
# Needs: hyperfine, qemu-img, python3, GNU time (/usr/bin/time) for peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in hyperfine qemu-img python3 /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "bench: $t is required (apt-get install hyperfine qemu-utils time)" >&2; exit 1; }
done
cargo build -q --release -p glimpse
G=${CARGO_TARGET_DIR:-$PWD/target}/release/glimpse
W=$PWD/bench/work
R=$PWD/bench/results
mkdir -p "$W" "$R"
RUNS=${RUNS:-5}
HEAVY_RUNS=${HEAVY_RUNS:-3}
SIZES=${SIZES:-1g 4g}
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(info check checksum compare convert compress)
# Dropping the page cache needs root.
can_drop() { [ -w /proc/sys/vm/drop_caches ]; }

# read_in FILE: start a hot case from a page cache that holds nothing else, so that reclaiming
# earlier cases' pages does not land in one tool's runs, then read FILE in with cat, as a file
# is after it was downloaded or read: neither tool's way of reading decides the cache both then
# copy from (glimpse's WILLNEED readahead leaves 4 KiB pages, which make later copies of them
# 5-10% dearer than the large folios of a sequential read; qemu-img's reads are not sensitive
# to it). As root it also compacts free memory: after earlier cases wrote and removed GiBs,
# free memory is fragmented, the page cache both tools fill gets fewer large folios, and the
# copies into it cost more, glimpse's more (on the Intel machine, 1 GiB raw -> qcow2 went from
# 124 ms against qemu-img's 191 ms to 116.5 ms against 191 ms when memory was compacted
# between two such runs). Compacting makes every case start from the same state.
read_in() {
    can_drop && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    if [ -w /proc/sys/vm/compact_memory ]; then echo 1 > /proc/sys/vm/compact_memory; fi
    cat "$1" >/dev/null
}

# Free page reporting (a VM's virtio-balloon): the guest hands memory that has been free for a
# while back to its host, and a run whose page cache lands on such memory pays the host a page
# fault per page. Conversions that write more than a GiB free that much again when the next
# run's prepare removes their output, so at 4 GiB both tools' runs fell by chance into a fast
# mode and one 2-4 times slower (glimpse 4 GiB raw -> raw: 0.42 s, or 1.65 s when its prepare
# waited 3 s first). Where it can (root, and a kernel that takes an order above the largest),
# the script stops reporting for its own run and restores the setting at exit, then writes to
# 8 GiB once so that memory is backed, as on a physical machine. PAGE_REPORTING=keep leaves
# it alone.
PR=/sys/module/page_reporting/parameters/page_reporting_order
if [ "${PAGE_REPORTING:-off}" = off ] && [ -w "$PR" ]; then
    pr_was=$(cat "$PR")
    if (echo 11 > "$PR") 2>/dev/null; then
        trap 'echo "$pr_was" > "$PR"' EXIT
        echo "== free page reporting off for this run (page_reporting_order $pr_was -> 11)"
        python3 -c 'block = b"\1" * (8 << 30)'
    else
        echo "== free page reporting stays on: this kernel takes no order above its largest"
    fi
fi

img() {  # make test images once
    [ -f "$W/mixed-1g.raw" ] || python3 bench/gen-mixed.py "$W/mixed-1g.raw" 1024 42
    [ -f "$W/mixed-2g.raw" ] || python3 bench/gen-mixed.py "$W/mixed-2g.raw" 2048 43
    for sz in $SIZES; do
        [ -f "$W/mixed-$sz.raw" ] || python3 bench/gen-mixed.py "$W/mixed-$sz.raw" $((${sz%g} * 1024)) 44
        [ -f "$W/mixed-$sz.qcow2" ] || qemu-img convert -f raw -O qcow2 "$W/mixed-$sz.raw" "$W/mixed-$sz.qcow2"
        [ -f "$W/mixed-$sz-zlib.qcow2" ] || qemu-img convert -W -m 8 -c -f raw -O qcow2 "$W/mixed-$sz.raw" "$W/mixed-$sz-zlib.qcow2"
    done
    [ -f "$W/mixed-1g.qcow2" ] || qemu-img convert -f raw -O qcow2 "$W/mixed-1g.raw" "$W/mixed-1g.qcow2"
    [ -f "$W/mixed-2g.qcow2" ] || qemu-img convert -f raw -O qcow2 "$W/mixed-2g.raw" "$W/mixed-2g.qcow2"
    [ -f "$W/mixed-1g-zlib.qcow2" ] || qemu-img convert -c -f raw -O qcow2 "$W/mixed-1g.raw" "$W/mixed-1g-zlib.qcow2"
    [ -f "$W/mixed-1g.vmdk" ] || qemu-img convert -f raw -O vmdk "$W/mixed-1g.raw" "$W/mixed-1g.vmdk"
    [ -f "$W/mixed-1g.vhd" ] || qemu-img convert -f raw -O vpc "$W/mixed-1g.raw" "$W/mixed-1g.vhd"
    [ -f "$W/empty-1t.qcow2" ] || qemu-img create -q -f qcow2 "$W/empty-1t.qcow2" 1T
}

hf() {  # hf NAME RUNS CMD_GLIMPSE CMD_PEER [PREPARE [WARMUP]]
    local name=$1 runs=$2 a=$3 b=$4 prep=${5:-} warm=${6:-1}
    local args=(--warmup "$warm" --runs "$runs" --export-json "$R/$name.json" -N --style basic)
    [ -z "$prep" ] || args+=(--prepare "$prep")
    echo "== $name"
    hyperfine "${args[@]}" -n glimpse "$a" -n peer "$b" | grep -E 'Time|±|faster' || true
}

rss() {  # rss NAME CMD...: peak RSS in KiB of one run
    local name=$1; shift
    /usr/bin/time -f '%M' -o "$R/$name.rss" "$@" >/dev/null 2>&1
}

img
for g in "${groups[@]}"; do
case $g in
info)
    for f in mixed-1g.qcow2 mixed-1g.vmdk mixed-1g.vhd empty-1t.qcow2; do
        fmt=; case $f in *.vhd) fmt="-f vpc";; esac
        hf "info-${f//./-}" 20 "$G info $W/$f" "qemu-img info $fmt $W/$f"
    done ;;
check)
    hf check-qcow2-1g "$RUNS" "$G check $W/mixed-1g.qcow2" "qemu-img check $W/mixed-1g.qcow2"
    hf check-qcow2-empty-1t "$RUNS" "$G check $W/empty-1t.qcow2" "qemu-img check $W/empty-1t.qcow2" ;;
checksum)
    hf checksum-vs-sha512sum "$RUNS" "$G checksum $W/mixed-1g.raw" "sha512sum $W/mixed-1g.raw"
    hf checksum-vs-md5-then-sha512 "$RUNS" "$G checksum $W/mixed-1g.raw" "sh -c 'md5sum $W/mixed-1g.raw; sha512sum $W/mixed-1g.raw'"
    hf content-vs-sha256sum "$RUNS" "$G checksum --content $W/mixed-1g.raw" "sha256sum $W/mixed-1g.raw"
    hf content-empty-1t "$RUNS" "$G checksum --content $W/empty-1t.qcow2" "true" ;;
compare)
    hf compare-raw-qcow2 "$RUNS" "$G compare $W/mixed-1g.raw $W/mixed-1g.qcow2" "qemu-img compare $W/mixed-1g.raw $W/mixed-1g.qcow2"
    hf compare-raw-zlib-qcow2 "$RUNS" "$G compare $W/mixed-1g.raw $W/mixed-1g-zlib.qcow2" "qemu-img compare $W/mixed-1g.raw $W/mixed-1g-zlib.qcow2" ;;
convert)
    # Uncompressed conversions: glimpse copies verbatim data file to file (copy_file_range).
    O=$W/out
    for sz in $SIZES; do
        S=$W/mixed-$sz.raw Q=$W/mixed-$sz.qcow2 Z=$W/mixed-$sz-zlib.qcow2
        cases=("raw-raw|-O raw $S|-O raw $S"
               "raw-qcow2|-O qcow2 $S|-O qcow2 $S"
               "raw-vdi|-O vdi $S|-O vdi $S"
               "raw-vhd|-O vhd $S|-O vpc $S"
               "qcow2-raw|-O raw $Q|-O raw $Q"
               "qcow2-vhd|-O vhd $Q|-O vpc $Q"
               "zlib-qcow2-raw|-O raw $Z|-O raw $Z")
        for c in "${cases[@]}"; do
            IFS='|' read -r name go qo <<<"$c"
            [ -z "${CASES:-}" ] || [[ " $CASES " == *" $name "* ]] || continue
            read_in "${go##* }"
            [[ " ${MODES:-hot cold} " == *" hot "* ]] &&
            hf "convert-$sz-$name-hot" "$RUNS" "$G convert $go $O.g" "qemu-img convert $qo $O.q" "sh -c 'rm -f $O.g $O.q; sync'"
            if [[ " ${MODES:-hot cold} " != *" cold "* ]]; then
                :
            elif can_drop; then
                hf "convert-$sz-$name-cold" "$RUNS" "$G convert $go $O.g" "qemu-img convert $qo $O.q" \
                    "sh -c 'rm -f $O.g $O.q; sync; echo 3 > /proc/sys/vm/drop_caches'" 0
            else
                echo "== convert-$sz-$name-cold: skipped (dropping the page cache needs root)"
            fi
        done
        # Onto outputs that already exist, as a pipeline run again converts: no prepare removes
        # them (the warm-up run makes them). glimpse replaces its output by a new file, which
        # must not cost more than qemu-img's rewrite in place (BENCHMARKS.md).
        if [[ " ${MODES:-hot cold} " == *" hot "* ]] &&
           { [ -z "${CASES:-}" ] || [[ " $CASES " == *" raw-qcow2-replace "* ]]; }; then
            read_in "$S"
            hf "convert-$sz-raw-qcow2-replace-hot" "$RUNS" "$G convert -O qcow2 $S $O.g" "qemu-img convert -O qcow2 $S $O.q"
            rm -f "$O.g" "$O.q"
        fi
        # Onto another file system (tmpfs: /dev/shm, or a /tmp that is one), where the kernel
        # refuses copy_file_range between the two (EXDEV) and glimpse splices instead.
        if [[ " ${MODES:-hot cold} " == *" hot "* ]] && [ -d /dev/shm ] &&
           { [ -z "${CASES:-}" ] || [[ " $CASES " == *" raw-qcow2-tmpfs "* ]]; }; then
            read_in "$S"
            T=/dev/shm/glimpse-bench-out
            hf "convert-$sz-raw-qcow2-tmpfs-hot" "$RUNS" "$G convert -O qcow2 $S $T.g" "qemu-img convert -O qcow2 $S $T.q" "sh -c 'rm -f $T.g $T.q'"
            rm -f "$T.g" "$T.q"
        fi
    done
    rss "convert-${SIZES##* }-raw-qcow2-glimpse" $G convert -O qcow2 "$W/mixed-${SIZES##* }.raw" "$O.g"; rm -f "$O.g" "$O.q" ;;
interleaved)
    # The two cases of the 0.6 target, in the page cache, measured in ROUNDS hyperfine runs of
    # RUNS_PER_ROUND each with the two tools' order swapped every round, so that a machine
    # whose speed drifts over a minute (a VM's host) weighs on both tools alike. All times go
    # into one result file per case.
    O=$W/out
    for sz in $SIZES; do
        S=$W/mixed-$sz.raw
        for o in raw qcow2; do
            read_in "$S"
            parts=()
            for r in $(seq 1 "${ROUNDS:-6}"); do
                a=("$G convert -O $o $S $O.g" "qemu-img convert -O $o $S $O.q") n=(glimpse peer)
                (( r % 2 )) || { a=("${a[1]}" "${a[0]}"); n=(peer glimpse); }
                hyperfine --warmup 1 --runs "${RUNS_PER_ROUND:-5}" -N --style none \
                    --export-json "$R/.round-$r.json" --prepare "sh -c 'rm -f $O.g $O.q; sync'" \
                    -n "${n[0]}" "${a[0]}" -n "${n[1]}" "${a[1]}" >/dev/null
                parts+=("$R/.round-$r.json")
            done
            python3 - "$R/interleaved-$sz-raw-$o.json" "${parts[@]}" <<'PY'
import json, sys
merged = {}
for path in sys.argv[2:]:
    for r in json.load(open(path))["results"]:
        merged.setdefault(r["command"], []).extend(r["times"])
json.dump({"results": [{"command": c, "times": t} for c, t in merged.items()]},
          open(sys.argv[1], "w"))
PY
            rm -f "${parts[@]}"
            echo "== interleaved-$sz-raw-$o: ${ROUNDS:-6} rounds of ${RUNS_PER_ROUND:-5} runs each"
        done
    done
    rm -f "$O.g" "$O.q" ;;
reflink)
    # REFLINK_DIR: a directory on XFS or btrfs (e.g. a loop-mounted XFS image).
    D=${REFLINK_DIR:?reflink needs REFLINK_DIR=a directory on XFS or btrfs}
    [ -f "$D/mixed-1g.raw" ] || cp --sparse=always "$W/mixed-1g.raw" "$D/mixed-1g.raw"
    hf "convert-1g-raw-raw-reflink" "$RUNS" "$G convert -O raw $D/mixed-1g.raw $D/out.g" "qemu-img convert -O raw $D/mixed-1g.raw $D/out.q" "sh -c 'rm -f $D/out.g $D/out.q; sync'"
    hf "convert-1g-raw-qcow2-reflink" "$RUNS" "$G convert -O qcow2 $D/mixed-1g.raw $D/out.g" "qemu-img convert -O qcow2 $D/mixed-1g.raw $D/out.q" "sh -c 'rm -f $D/out.g $D/out.q; sync'"
    hf "convert-1g-raw-vhd-reflink" "$RUNS" "$G convert -O vhd $D/mixed-1g.raw $D/out.g" "qemu-img convert -O vpc $D/mixed-1g.raw $D/out.q" "sh -c 'rm -f $D/out.g $D/out.q; sync'"
    hf "convert-1g-raw-vdi-reflink" "$RUNS" "$G convert -O vdi $D/mixed-1g.raw $D/out.g" "qemu-img convert -O vdi $D/mixed-1g.raw $D/out.q" "sh -c 'rm -f $D/out.g $D/out.q; sync'"
    rm -f "$D/out.g" "$D/out.q" ;;
compress)
    O=$W/out
    for sz in 1g 2g; do
        S=$W/mixed-$sz.raw
        hf "convert-$sz-raw-qcow2-zlib" "$HEAVY_RUNS" "$G convert -c -O qcow2 $S $O.g" "qemu-img convert -c -O qcow2 $S $O.q" "sh -c 'rm -f $O.g $O.q; sync'"
        hf "convert-$sz-raw-qcow2-zlib-vs-W-m8" "$HEAVY_RUNS" "$G convert -c -O qcow2 $S $O.g" "qemu-img convert -W -m 8 -c -O qcow2 $S $O.q" "sh -c 'rm -f $O.g $O.q; sync'"
        hf "convert-$sz-raw-qcow2-zstd" "$HEAVY_RUNS" "$G convert -c -O qcow2 -o compression_type=zstd $S $O.g" "qemu-img convert -c -O qcow2 -o compression_type=zstd $S $O.q" "sh -c 'rm -f $O.g $O.q; sync'"
        hf "convert-$sz-raw-vmdk-stream" "$HEAVY_RUNS" "$G convert -O vmdk -o subformat=streamOptimized $S $O.g" "qemu-img convert -O vmdk -o subformat=streamOptimized $S $O.q" "sh -c 'rm -f $O.g $O.q; sync'"
    done
    # Output sizes at the same codec, and peak memory.
    S=$W/mixed-2g.raw
    : > "$R/convert-sizes.tsv"
    for v in "qcow2-zlib|-c -O qcow2|-c -O qcow2" "qcow2-zstd|-c -O qcow2 -o compression_type=zstd|-c -O qcow2 -o compression_type=zstd" \
             "vmdk-stream|-O vmdk -o subformat=streamOptimized|-O vmdk -o subformat=streamOptimized"; do
        IFS='|' read -r name go qo <<<"$v"
        rss "convert-2g-$name-glimpse" $G convert $go "$S" "$O.g"
        rss "convert-2g-$name-qemu" qemu-img convert $qo "$S" "$O.q"
        printf '%s\t%s\t%s\n' "$name" "$(stat -c %s "$O.g")" "$(stat -c %s "$O.q")" >> "$R/convert-sizes.tsv"
        rm -f "$O.g" "$O.q"
    done ;;
*) echo "unknown group $g" >&2; exit 2 ;;
esac
done
python3 bench/summarize.py "$R" > "$R/summary.md"
cat "$R/summary.md"
