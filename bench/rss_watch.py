"""Sample the resident memory of running processes from outside, by kind, for benchmarks whose peak RSS
must be explained (bench_stream.py's streamed run against its CPU bound).

Every 0.5 s, for each process whose command line contains PATTERN: VmRSS, RssAnon (heap and anonymous
mappings), RssFile (mapped files: libraries, safetensors mmaps) and RssShmem (shared mappings: CUDA pinned
host memory), their maxima, the values at the VmRSS peak and the 15 largest mappings at that peak (from
/proc/<pid>/smaps). Linux only. The JSON is rewritten after every sample; stop it with a signal.

Usage:  python bench/rss_watch.py OUT.json PATTERN &      e.g.  python bench/rss_watch.py rss.json --child &
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def _status(pid: str) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in KEYS:
            out[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return out


def _largest_mappings(pid: str, n: int = 15) -> list[list]:
    maps: list[list] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            maps.append([0.0, line.strip()[:160]])
        elif head == "Rss:" and maps:
            maps[-1][0] = round(int(line.split()[1]) / 2**20, 3)
    return sorted(maps, key=lambda m: -m[0])[:n]


def main() -> None:
    out, pattern = Path(sys.argv[1]), sys.argv[2]
    seen: dict[str, dict] = {}
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                if pattern not in cmd or "rss_watch" in cmd:
                    continue
                now = _status(pid)
                entry = seen.setdefault(pid, {"cmd": cmd[:300], "max": {}, "at_peak": {}, "mappings_at_peak": []})
                entry["max"] = {k: max(entry["max"].get(k, 0.0), v) for k, v in now.items()}
                if now.get("VmRSS", 0.0) >= entry["at_peak"].get("VmRSS", 0.0):
                    entry["at_peak"] = now
                    if now["VmRSS"] > entry.get("mapped_at", 0.0) + 0.1:  # smaps is costly: every 0.1 GiB
                        entry["mappings_at_peak"], entry["mapped_at"] = _largest_mappings(pid), now["VmRSS"]
            except (OSError, ValueError):  # the process ended between listing and reading
                continue
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen, indent=1))
        tmp.replace(out)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
