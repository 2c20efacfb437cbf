"""Benchmark of the annotation index: build time and memory per record at 100k, 1M and 5M records.

Each size runs in a fresh interpreter (peak RSS is per process) that opens a synthetic annotation the way a
training rank does (index, one epoch's mixing order, the first record read and parsed) and reports the peak
memory above the interpreter's baseline, per record. The figures measured on `main` before the index (every
record parsed and held on every rank) are kept beside them for comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

# Peak memory of one rank reading a whole annotation into parsed records (measured on main before the index,
# 2-core development machine): records → GB.
BEFORE_PEAK_GB = {100_000: 0.62, 500_000: 1.45, 1_000_000: 2.49}

_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    from vlpipe.model.data.index import annotation_index
    from vlpipe.model.data.meta import Dataset, DatasetSpec
    from vlpipe.model.data.mixing import epoch_order

    path, cached = sys.argv[1], sys.argv[2] == "1"
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = rss()
    start = time.perf_counter()
    index = annotation_index(path, max_line_bytes=8 << 20, cache=cached)
    built = time.perf_counter() - start
    dataset = Dataset("bench", DatasetSpec(annotation=path), index)
    order = epoch_order(len(dataset), 1.0, 0, "bench", 0)
    first = dataset.record(int(order[0]))
    first_sample = time.perf_counter() - start
    print(json.dumps({
        "records": len(dataset), "seconds": built, "first_sample_seconds": first_sample,
        "peak_extra_bytes": rss() - base, "held_bytes": index.nbytes + order.nbytes, "ok": "conversations" in first,
    }))
    """
)


def write_synthetic(path: Path, n: int) -> None:
    """`n` short text records in InternVL's conversation format (about 110 bytes each)."""
    line = '{{"id": {i}, "conversations": [{{"from": "human", "value": "Q{i}?"}}, {{"from": "gpt", "value": "A{i}."}}]}}\n'
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(line.format(i=i) for i in range(start, min(n, start + 100_000))))


def _probe(path: Path, cached: bool) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), "1" if cached else "0"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_annotation_index(work: Path, sizes: tuple[int, ...] = (100_000, 1_000_000, 5_000_000)) -> dict:
    """Build time (cold), cached open time, first-sample time and memory per record at each size."""
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for n in sizes:
        path = work / f"synthetic-{n}.jsonl"
        if not path.exists():
            write_synthetic(path, n)
        cold = _probe(path, cached=False)
        _probe(path, cached=True)  # writes the cache
        warm = _probe(path, cached=True)
        rows[n] = {
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "build_seconds": round(cold["seconds"], 3),
            "build_seconds_per_million": round(cold["seconds"] / n * 1e6, 3),
            "cached_open_seconds": round(warm["seconds"], 4),
            "first_sample_seconds": round(cold["first_sample_seconds"], 3),
            "held_bytes_per_record": round(cold["held_bytes"] / n, 1),
            "peak_bytes_per_record_building": round(cold["peak_extra_bytes"] / n, 1),
            "peak_bytes_per_record_cached": round(warm["peak_extra_bytes"] / n, 1),
            "before_peak_gb": BEFORE_PEAK_GB.get(n),
            "after_peak_gb": round(cold["peak_extra_bytes"] / 1e9, 3),
        }
        path.unlink()  # the files are large; the cache entry is keyed by inode and goes stale with them
    largest = rows[max(sizes)]
    smallest = rows[min(sizes)]
    return {
        "sizes": rows,
        "held_bytes_per_record": largest["held_bytes_per_record"],
        "peak_bytes_per_record_building": largest["peak_bytes_per_record_building"],
        "build_time_ratio_largest_vs_smallest_per_record": round(
            largest["build_seconds_per_million"] / max(smallest["build_seconds_per_million"], 1e-9), 2
        ),
        "goal_bytes_per_record": 32,
    }


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """`n` MMPR-like preference pairs (an image path, a question, long chosen/rejected answers; ~2 KB each)."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            pair = {
                "image": f"ScienceQA/train/{i}/image.png",
                "question": "<image>\nWhich option best describes the figure? " + "x" * rng.randint(50, 400),
                "chosen": "Let me think step by step. " + "a" * rng.randint(100, 1500) + " The answer is A.",
                "rejected": "Looking at the image, " + "b" * rng.randint(100, 1500) + " The answer is B.",
            }
            f.write(json.dumps(pair) + "\n")


def bench_record_set(work: Path, n: int = 100_000) -> dict:
    """Memory of reading `n` MPO pairs: every record parsed and held (the reader before offsets) vs the record
    set that keeps offsets and parses on access; tracemalloc's held and peak bytes, in this process."""
    import time
    import tracemalloc

    from vlpipe.components.mpo.data import validate_pair
    from vlpipe.components.training.records import read_record_set
    from vlpipe.model.files import JsonlReader

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"pairs-{n}.jsonl"
    write_pairs(path, n)

    def held_dicts() -> list:
        return [
            line.value
            for line in JsonlReader(str(path), "bench")
            if line.error is None and not validate_pair(line.value)
        ]

    def lazy():
        return read_record_set(str(path), "bench", validate_pair, 0.0)

    rows = {}
    for name, read in (("parsed", held_dicts), ("offsets", lazy)):
        tracemalloc.start()
        start = time.perf_counter()
        result = read()
        seconds = time.perf_counter() - start
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows[name] = {
            "seconds": round(seconds, 2),
            "held_bytes_per_record": round(held / n, 1),
            "peak_mb": round(peak / 1e6, 1),
        }
        del result
    file_mb = round(path.stat().st_size / 1e6, 1)
    path.unlink()
    return {
        "records": n,
        "file_mb": file_mb,
        **rows,
        "held_ratio_parsed_vs_offsets": round(
            rows["parsed"]["held_bytes_per_record"] / max(rows["offsets"]["held_bytes_per_record"], 1e-9), 1
        ),
    }
