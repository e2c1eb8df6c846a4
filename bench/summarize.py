#!/usr/bin/env python3
"""Summarises hyperfine JSON results in a folder as a Markdown table: for glimpse and its peer
the median wall time with the minimum and maximum, and the ratio of the medians (glimpse /
peer), plus output sizes and peak RSS."""
import glob
import json
import os
import statistics
import sys

d = sys.argv[1]


def cell(r):
    times = r.get("times") or [r["mean"]]
    med = r.get("median") or statistics.median(times)
    return med, f"{med:.3f} [{min(times):.3f}–{max(times):.3f}]"


print("| benchmark | glimpse median [min–max] (s) | peer median [min–max] (s) | ratio of medians |")
print("| --- | ---: | ---: | ---: |")
for path in sorted(glob.glob(os.path.join(d, "*.json"))):
    res = {r["command"]: r for r in json.load(open(path))["results"]}
    g, p = res.get("glimpse"), res.get("peer")
    if not g or not p:
        continue
    gm, gs = cell(g)
    pm, ps = cell(p)
    ratio = gm / pm if pm > 0 else float("nan")
    print(f"| {os.path.basename(path)[:-5]} | {gs} | {ps} | {ratio:.2f} |")
sizes = os.path.join(d, "convert-sizes.tsv")
if os.path.exists(sizes):
    print("\n| output (2 GiB mixed) | glimpse bytes | qemu-img bytes | glimpse/qemu |")
    print("| --- | ---: | ---: | ---: |")
    for line in open(sizes):
        name, g, q = line.split()
        print(f"| {name} | {g} | {q} | {int(g) / int(q):.4f} |")
rss = sorted(glob.glob(os.path.join(d, "*.rss")))
if rss:
    print("\n| peak RSS | MiB |")
    print("| --- | ---: |")
    for path in rss:
        kib = int(open(path).read().split()[-1])
        print(f"| {os.path.basename(path)[:-4]} | {kib / 1024:.1f} |")
