#!/usr/bin/env bash
# Builds the seed corpora of every fuzz target into fuzz/corpus/<target>/ (or into the folder
# given as $1). Seeds are small images made with qemu-img, genisoimage, xorriso, sgdisk,
# mkfs.vfat and tar, plus cut-down copies of them that keep only the header and metadata
# clusters (the first 64 KiB, 256 KiB or 1 MiB), so that libFuzzer mutates metadata rather
# than guest data. Corpora are not committed: run this script instead. It is idempotent
# (files are named by content hash, so running it again adds nothing twice) and never
# deletes what the fuzzer has added to a corpus.
#
# Needs: qemu-img, genisoimage, xorriso, sgdisk, mkfs.vfat, tar, sha1sum, truncate.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for tool in qemu-img genisoimage xorriso sgdisk mkfs.vfat tar sha1sum truncate; do
    command -v "$tool" >/dev/null || { echo "seeds.sh: $tool is required" >&2; exit 2; }
done

targets=(detect qcow2 vmdk vmdk_descriptor vhd vhdx vdi parallels iso ova luks check reader convert_roundtrip)
for t in "${targets[@]}"; do mkdir -p "$out/$t"; done

# Images larger than this are left out: libFuzzer copies every input, and big inputs are
# mostly guest data it should not spend mutations on.
max_seed=$((4 << 20))

# add TARGET FILE...: copies each file into the target's corpus under its content hash.
add() {
    local t=$1 f h
    shift
    for f in "$@"; do
        [ -f "$f" ] || continue
        [ "$(stat -c %s "$f")" -le "$max_seed" ] || continue
        h=$(sha1sum "$f" | cut -c1-40)
        cp "$f" "$out/$t/seed-$h"
    done
}

# cuts FILE SIZE...: writes FILE.cutSIZE, the first SIZE bytes, for each size smaller than FILE.
cuts() {
    local f=$1 s
    shift
    for s in "$@"; do
        if [ "$(stat -c %s "$f")" -gt "$s" ]; then head -c "$s" "$f" >"$f.cut$s"; fi
    done
}

qi() { qemu-img "$@" >/dev/null; }

cd "$work"

# A 4 MiB guest disk with text (compressible), random (incompressible) and zero regions, and
# data at cluster and grain boundaries, so that tables have entries of every kind.
truncate -s 4M disk.raw
seq 1 20000 | dd of=disk.raw conv=notrunc status=none
head -c 131072 /dev/urandom | dd of=disk.raw bs=64k seek=8 conv=notrunc status=none
printf 'glimpse seed: sector at 1M-512\n' | dd of=disk.raw bs=512 seek=2047 conv=notrunc status=none
printf 'glimpse seed: last sector\n' | dd of=disk.raw bs=512 seek=8191 conv=notrunc status=none

# ---- qcow2 -----------------------------------------------------------------------------
mkdir q && cd q
qi convert -O qcow2 ../disk.raw v3.qcow2
qi convert -O qcow2 -o compat=0.10 ../disk.raw v2.qcow2
qi convert -O qcow2 -o cluster_size=512 ../disk.raw c512.qcow2
qi convert -O qcow2 -o cluster_size=2M ../disk.raw c2m.qcow2
qi convert -O qcow2 -o lazy_refcounts=on ../disk.raw lazy.qcow2
qi convert -O qcow2 -o extended_l2=on ../disk.raw l2ext.qcow2
qi convert -O qcow2 -o refcount_bits=1 ../disk.raw rc1.qcow2
qi convert -O qcow2 -o refcount_bits=64 ../disk.raw rc64.qcow2
qi convert -O qcow2 -c ../disk.raw zlib.qcow2
qi convert -O qcow2 -c -o compression_type=zstd ../disk.raw zstd.qcow2
qi convert -O qcow2 -o preallocation=metadata ../disk.raw prealloc.qcow2
qi create -f qcow2 empty-1t.qcow2 1T
qi create -f qcow2 -b v3.qcow2 -F qcow2 backing.qcow2
qi create -f qcow2 -o data_file=external.raw datafile.qcow2 4M
qi create -f qcow2 --object secret,id=s0,data=glimpse \
    -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 encrypted.qcow2 4M
for f in *.qcow2; do cuts "$f" 65536 262144; done
add qcow2 *.qcow2*
cd ..

# ---- QED (detected so it can be refused) -----------------------------------------------------
qi create -f qed disk.qed 4M
add detect disk.qed

# ---- vmdk ------------------------------------------------------------------------------
mkdir v && cd v
qi convert -O vmdk ../disk.raw sparse.vmdk
qi convert -O vmdk -o subformat=streamOptimized ../disk.raw stream.vmdk
qi convert -O vmdk -o compat6=on ../disk.raw compat6.vmdk
qi convert -O vmdk -o zeroed_grain=on ../disk.raw zeroed.vmdk
qi create -f vmdk empty-64g.vmdk 64G
qi create -f vmdk -b sparse.vmdk -F vmdk child.vmdk
for f in *.vmdk; do cuts "$f" 65536 262144; done
add vmdk *.vmdk*
# Descriptor files on their own, without the extent files they name.
mkdir d
qi create -f vmdk -o subformat=twoGbMaxExtentSparse d/split-sparse.vmdk 4M
qi create -f vmdk -o subformat=twoGbMaxExtentFlat d/split-flat.vmdk 4M
qi create -f vmdk -o subformat=monolithicFlat d/flat.vmdk 4M
# The descriptor embedded in sparse extents (sectors 1-20), with its padding removed.
dd if=child.vmdk bs=512 skip=1 count=20 status=none | tr -d '\000' >d/child-embedded.txt
dd if=stream.vmdk bs=512 skip=1 count=20 status=none | tr -d '\000' >d/stream-embedded.txt
sed 's/$/\r/' d/flat.vmdk >d/flat-crlf.txt
sed 's/=/ = /; s/^RW/RW   /' d/split-sparse.vmdk >d/spaced.txt
for f in d/*; do [ "$(stat -c %s "$f")" -le 65536 ] && add vmdk_descriptor "$f"; done
cd ..

# ---- vhd -------------------------------------------------------------------------------
mkdir h && cd h
qi convert -O vpc -o subformat=dynamic ../disk.raw dynamic.vhd
qi convert -O vpc -o subformat=dynamic,force_size=on ../disk.raw dynamic-force.vhd
qi convert -O vpc -o subformat=fixed ../disk.raw fixed.vhd
qi convert -O vpc -o subformat=fixed,force_size=on ../disk.raw fixed-force.vhd
qi create -f vpc empty-64g.vhd 64G
for f in dynamic.vhd dynamic-force.vhd empty-64g.vhd; do
    # Header, BAT and first blocks, with the footer put back at the end where readers look.
    head -c 65536 "$f" >"$f.cut"
    tail -c 512 "$f" >>"$f.cut"
done
add vhd *.vhd*
cd ..

# ---- vhdx ------------------------------------------------------------------------------
mkdir x && cd x
qi convert -O vhdx ../disk.raw dynamic.vhdx
qi convert -O vhdx -o block_size=1M ../disk.raw block1m.vhdx
qi create -f vhdx -o block_state_zero=off empty-nozero.vhdx 4M
qi convert -O vhdx -o subformat=fixed ../disk.raw fixed.vhdx
qi create -f vhdx empty-64g.vhdx 64G
# qemu puts the headers and region tables in the first MiB, the log in the second, then the
# BAT and the metadata region: a 4 MiB cut keeps all metadata and no payload block.
for f in *.vhdx; do cuts "$f" 1048576 4194304; done
add vhdx *.vhdx*
cd ..

# ---- vdi -------------------------------------------------------------------------------
mkdir i && cd i
qi convert -O vdi ../disk.raw dynamic.vdi
qi convert -O vdi -o static=on ../disk.raw static.vdi
qi create -f vdi empty-64g.vdi 64G
for f in dynamic.vdi static.vdi; do cuts "$f" 65536; done
add vdi *.vdi*
cd ..

# ---- parallels -------------------------------------------------------------------------
mkdir p && cd p
qi convert -O parallels -o cluster_size=4k ../disk.raw c4k.parallels
qi convert -O parallels ../disk.raw c1m.parallels
qi create -f parallels empty-64g.parallels 64G
for f in c4k.parallels c1m.parallels; do cuts "$f" 65536; done
add parallels *.parallels* "$here"/../fixtures/parallels/*.parallels \
    "$here"/../fixtures/hostile/parallels/*.parallels "$here"/../fixtures/hostile/parallels/*.xml
cd ..

# ---- iso -------------------------------------------------------------------------------
mkdir o o/tree o/tree/sub && cd o
printf 'hello\n' >tree/readme.txt
printf 'nested\n' >tree/sub/file.txt
genisoimage -quiet -o plain.iso tree
genisoimage -quiet -J -R -V GLIMPSE -o jr.iso tree
xorriso -as mkisofs -quiet -o xorriso.iso tree 2>/dev/null
for f in *.iso; do cuts "$f" 65536; done
add iso *.iso*
cd ..

# ---- ova -------------------------------------------------------------------------------
mkdir a && cd a
cp ../v/stream.vmdk disk1.vmdk
ovf() { # $1 href
    cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="$1" ovf:id="file1" ovf:size="$(stat -c %s disk1.vmdk)"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="4194304" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="glimpse-seed">
    <Info>A seed appliance</Info>
  </VirtualSystem>
</Envelope>
EOF
}
ovf disk1.vmdk >appliance.ovf
{
    printf 'SHA256(appliance.ovf)= %s\n' "$(sha256sum appliance.ovf | cut -d' ' -f1)"
    printf 'SHA256(disk1.vmdk)= %s\n' "$(sha256sum disk1.vmdk | cut -d' ' -f1)"
} >appliance.mf
tar --format=ustar -cf ustar.ova appliance.ovf appliance.mf disk1.vmdk
tar --format=gnu -cf gnu.ova appliance.ovf disk1.vmdk
tar --format=ustar -cf ovf-last.ova disk1.vmdk appliance.ovf
mkdir esc && ovf ../../../etc/passwd >esc/appliance.ovf
tar --format=ustar -C esc -cf href-escape.ova appliance.ovf
for f in *.ova; do cuts "$f" 65536; done
add ova *.ova*
cd ..

# ---- luks ------------------------------------------------------------------------------
mkdir l && cd l
qi create -f luks --object secret,id=s0,data=glimpse -o key-secret=s0,iter-time=10 v1.luks 1M
qi create -f luks --object secret,id=s0,data=glimpse \
    -o key-secret=s0,iter-time=10,cipher-alg=aes-128,hash-alg=sha1 aes128.luks 1M
for f in *.luks; do cuts "$f" 65536 1048576; done
add luks *.luks*
cd ..

# ---- raw disks with partition tables -----------------------------------------------------------
mkdir r && cd r
truncate -s 2M gpt.raw && sgdisk -q -n 1:2048:0 -t 1:8300 gpt.raw >/dev/null
truncate -s 2M mbr.raw && sgdisk -q -n 1:2048:0 gpt-to-mbr.raw >/dev/null 2>&1 || true
truncate -s 2M hybrid.raw && sgdisk -q -n 1:2048:0 -h 1 hybrid.raw >/dev/null
truncate -s 2M fat.raw && mkfs.vfat fat.raw >/dev/null
for f in *.raw; do cuts "$f" 65536; done
raws=(*.raw*)
cd ..

# ---- detect: head and tail windows of every format, and polyglots --------------------------------
mkdir w
for f in q/*.qcow2 v/*.vmdk v/d/* h/*.vhd x/*.vhdx i/*.vdi p/*.parallels o/*.iso a/*.ova l/*.luks r/*.raw disk.qed; do
    n=w/$(basename "$f").win
    if [ "$(stat -c %s "$f")" -le $((65536 + 512)) ]; then cp "$f" "$n"; else
        head -c 65536 "$f" >"$n"
        tail -c 512 "$f" >>"$n"
    fi
done
# qcow2 header with an ISO volume descriptor at 32 KiB.
head -c 65536 q/v3.qcow2 >w/poly-qcow2-iso
dd if=o/plain.iso of=w/poly-qcow2-iso bs=2048 skip=16 seek=16 count=2 conv=notrunc status=none
# A raw disk ending in a fixed-VHD footer.
head -c 65536 disk.raw >w/poly-raw-vhd-footer
tail -c 512 h/fixed.vhd >>w/poly-raw-vhd-footer
add detect w/*

# ---- check and reader: every image and cut-down copy, plus partitioned raw disks ------------------
for t in check reader; do
    for d in qcow2 vmdk vmdk_descriptor vhd vhdx vdi parallels iso ova luks; do
        cp -n "$out/$d"/* "$out/$t"/ 2>/dev/null || true
    done
    (cd r && add "$t" "${raws[@]}")
done

# ---- convert_roundtrip: hand-made layouts (see the target's file comment) ------------------------
mkdir c
# 0 bytes
printf '\x00\x00\x00' >c/empty
# 1006 bytes in memory: one 512-byte run repeating "ab", zeros after
printf '\x3e\x00\x00\x00\x01ab' >c/odd-1006
# 1 MiB - 1, file-backed: 64 KiB of "glm", 128 KiB of zeros, 64 KiB random, zeros to the end
printf '\xff\xff\x01\x40\x02glm\xc1\x40\x80a\xff' >c/max-mixed-file
# the same in memory
printf '\xff\xff\x00\x40\x02glm\xc1\x40\x80a\xff' >c/max-mixed-mem
# the same file-backed, outputs in the default temporary directory (paired copies on ext4)
printf '\xff\xff\x03\x40\x02glm\xc1\x40\x80a\xff' >c/max-mixed-disk
# 303 KiB, file-backed: sector-sized data and zero runs across cluster boundaries
printf '\xc0\x4b\x01\x00\x01ab\x80\x3f\x00z\xbf\x41\x00q\x81\x00\x00w' >c/alternating
# 512 KiB of incompressible data
printf '\x00\x80\x00\x47\x87seedseed' >c/random-512k
# 4625 bytes, file-backed: 4 KiB of zeros, then data up to the last (odd) byte
printf '\x21\x01\x01\x87\x01\x02end' >c/tail-data
add convert_roundtrip c/*

for t in "${targets[@]}"; do
    printf '%-18s %4d seeds\n' "$t" "$(find "$out/$t" -type f | wc -l)"
done

# ---- detect: probe-parity VMDK descriptors, an ISO with a descriptor in its system area, and
# formats glimpse detects but does not read (committed fixtures, see their READMEs) ---------------
fx="$here/../fixtures/hostile"
add detect "$fx"/vmdk/version-first-extent-after-comments.vmdk "$fx"/vmdk/binary-after-nul.vmdk \
    "$fx"/vmdk/control-char-in-comment.vmdk "$fx"/vmdk/cowd-parent-hint.vmdk \
    "$fx"/iso/vmdk-descriptor-in-system-area.iso "$fx"/unsupported/*.bochs \
    "$fx"/unsupported/*.cloop "$fx"/unsupported/*.dmg "$fx"/unsupported/*.parallels \
    "$fx"/unsupported/*.qcow
# qcow1 is opened as far as its header (virtual size, backing file): the check target
# reaches that parser through detection.
add check "$fx"/unsupported/*.qcow
add vmdk_descriptor "$fx"/vmdk/version-first-extent-after-comments.vmdk \
    "$fx"/vmdk/binary-after-nul.vmdk "$fx"/vmdk/control-char-in-comment.vmdk
# qcow2 hostile fixtures (reserved bits, metadata overlaps, cut clusters, incomplete snapshots).
add qcow2 "$here"/../fixtures/hostile/qcow2/*.qcow2
add check "$here"/../fixtures/hostile/qcow2/*.qcow2
# ---- ova: the committed hostile archives (reader differentials, GNU sparse, gzip members) ---
for t in ova check; do add "$t" "$here"/../fixtures/hostile/ova/*.ova; done
