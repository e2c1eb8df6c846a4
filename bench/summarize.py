#!/usr/bin/env python3
"""Summarises hyperfine JSON results in a folder as a Markdown table of ratios
(glimpse mean wall time / peer mean wall time), plus output sizes and peak RSS."""
import glob
import json
import os
import sys

d = sys.argv[1]
print("| benchmark | glimpse (s) | peer (s) | ratio |")
print("| --- | ---: | ---: | ---: |")
for path in sorted(glob.glob(os.path.join(d, "*.json"))):
    res = {r["command"]: r for r in json.load(open(path))["results"]}
    g, p = res.get("glimpse"), res.get("peer")
    if not g or not p:
        continue
    ratio = g["mean"] / p["mean"] if p["mean"] > 0 else float("nan")
    print(f"| {os.path.basename(path)[:-5]} | {g['mean']:.3f} ± {g['stddev'] or 0:.3f} "
          f"| {p['mean']:.3f} ± {p['stddev'] or 0:.3f} | {ratio:.2f} |")
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
