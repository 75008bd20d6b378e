#!/usr/bin/env python3
"""The request's segments between the two applications' stacks, per network and size (means
and p50s from the JSON a `profiler compare --json` wrote), and their sum: the datapath without
the wake-ups, which move by microseconds from run to run on a shared machine.
Usage: python3 benchmarks/segments.py COMPARE.json > COMPARE-segments.txt"""
import json
import sys

c = json.load(open(sys.argv[1]))
sums = []
for r in c["runs"]:
    d = next(d for d in r["directions"] if d["direction"] == "request")
    inner = d["segments"][1:-1]
    what = f"{r['topology']} at {r['traffic']['size']} B"
    print(f"{what}, request (mean / p50, us):")
    for s in inner:
        print(f"  {s['name']:<52} {s['mean_ns'] / 1e3:6.1f} {s['p50_ns'] / 1e3:6.1f}")
    total = sum(s["mean_ns"] for s in inner) / 1e3
    print(f"  {'between the stacks, sum of the means':<52} {total:6.1f}")
    sums.append(f"{what:<40} {total:6.1f} us")
print("\nbetween the stacks, request, sum of the segments' means:")
print("\n".join(sums))
