#!/usr/bin/env python3
"""The way across each guest NIC of benchmarks/bmp2vmp-nic.sh's runs, from their JSON: the
crossings (their measured sum, each way's estimate) and end to end at p50, and the segments
measured in each kernel as the sum of their means.
Usage: python3 benchmarks/bmp2vmp-nic.py > benchmarks/bmp2vmp-nic.txt"""
import json


def us(ns):
    return f"{ns / 1e3:7.1f}"


print("bmp2vmp --inner bridge, UDP 64 B, 200 exchanges at 20/s, by guest NIC (us)")
for nic in ["tap", "vhost-user"]:
    r = json.load(open(f"benchmarks/bmp2vmp-nic-{nic}.json"))
    c = r["crossings"][0]
    print(f"\n--nic {nic}: {r['traffic']['completed']} of {r['traffic']['count']} exchanges, "
          f"{r['events']['lost']} events lost")
    print(f"  {'both crossings together, p50 (measured)':<72} {us(c['crossing_sum']['p50_ns'])}")
    for d in r["directions"]:
        way = d["direction"]
        measured = [s for s in d["segments"] if not s.get("estimated")]
        for s in d["segments"]:
            if s.get("estimated"):
                print(f"  {way:<8} {s['name'] + ', p50 (estimated)':<63} {us(s['p50_ns'])}")
        for node in ["host", c["node"]]:
            mine = [s for s in measured if (d["hops"][s["to"]]["node"] == c["node"]) == (node != "host")]
            total = sum(s["mean_ns"] for s in mine)
            print(f"  {way:<8} {f'{len(mine)} segments in {node}, sum of means':<63} {us(total)}")
        print(f"  {way:<8} {'end to end, p50':<63} {us(d['end_to_end']['p50_ns'])}")
