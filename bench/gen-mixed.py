#!/usr/bin/env python3
"""Writes a deterministic disk image with realistic mixed content: in 1 MiB chunks, about 40%
random (incompressible), 20% text-like (compressible), the rest zero (left as holes).

usage: gen-mixed.py OUT SIZE_MIB [SEED]"""
import random
import sys

out, size_mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 42)
words = [bytes(w, "ascii") for w in (
    "the quick brown fox jumps over lazy dog kernel module init systemd service "
    "config value error warning info debug package version install usr lib bin etc "
    "var log cache home root boot efi grub linux vmlinuz initrd image disk block").split()]
MiB = 1 << 20
with open(out, "wb") as f:
    for i in range(size_mib):
        r = rng.random()
        if r < 0.4:
            f.seek(i * MiB)
            f.write(rng.randbytes(MiB))
        elif r < 0.6:
            buf = bytearray()
            while len(buf) < MiB:
                line = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
                buf += line + b"\n"
            f.seek(i * MiB)
            f.write(bytes(buf[:MiB]))
    f.truncate(size_mib * MiB)
