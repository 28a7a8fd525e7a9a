"""Shared by the benchmarks: timing by interleaved repeats, and writing a section of bench/RESULTS.md."""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_model() -> str:
    """The CPU's model name (the same session may land on different VMs: tables must say which)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return (f"{platform.machine()} {cpu_model()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} "
            f"{platform.python_version()}")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between <!-- NAME --> markers in bench/RESULTS.md."""
    stamp = f"_Measured {dt.date.today().isoformat()} on {machine()}._\n\n"
    block = f"<!-- {name} -->\n{stamp}{markdown.strip()}\n<!-- /{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in bench/.\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
