"""Run every benchmark part in one go and report numbers, ratios and targets.

    .venv/bin/python -m benchmarks            # full run (15 to 20 minutes on 2 cores)
    .venv/bin/python -m benchmarks --quick    # about 4 minutes, smaller sizes
    .venv/bin/python -m benchmarks --parts inprocess,floors

The report (Markdown) and raw results (JSON) go to test-artifacts/benchmarks/;
a full run also redraws benchmarks/lookup_vs_sessions.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Any

from benchmarks import concurrency, endtoend, floors, inprocess, instructions, scale, targets
from benchmarks.common import (
    ARTIFACTS,
    ROOT,
    Settings,
    available_store_kinds,
    cleanup_services,
)
from benchmarks.plot import lookup_plot

PARTS = ("inprocess", "instructions", "floors", "concurrency", "endtoend", "scale")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607 - read-only
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "packages": ", ".join(
            f"{name} {version(name)}"
            for name in ("starlette", "starsessions", "asyncpg", "redis", "uvicorn")
        ),
    }


async def run_async_part(name: str, settings: Settings, kinds: list[str]) -> Any:
    if name == "inprocess":
        return await inprocess.run(settings, kinds)
    if name == "floors":
        return await floors.run(settings, kinds)
    if name == "concurrency":
        return await concurrency.run(settings, kinds)
    return await scale.run(settings, kinds)


def run_part(name: str, settings: Settings, kinds: list[str], results: dict[str, Any]) -> None:
    """One part, timed; a failing part is reported and the others still run."""
    titles = {
        "inprocess": "in process: per-request cost",
        "instructions": "in process: instructions per request (callgrind)",
        "floors": "the store's own floor",
        "concurrency": "in process: many request streams at once",
        "endtoend": "end to end: uvicorn + wrk",
        "scale": "scale",
    }
    print(f"== {titles[name]}", flush=True)
    started = time.perf_counter()
    try:
        if name == "endtoend":
            results[name] = endtoend.run(settings, kinds)
        elif name == "instructions":
            results[name] = instructions.run(settings, kinds)
        else:
            results[name] = asyncio.run(run_async_part(name, settings, kinds))
    except Exception as exc:
        print(f"   error: the {name} part failed: {exc!r}", flush=True)
        results.setdefault("errors", {})[name] = repr(exc)
        return
    if name == "inprocess":
        print(inprocess.table(results[name]))
        print("CPU time of this process per request:")
        print(inprocess.table(results[name], cpu=True))
    elif name == "instructions" and results[name]:
        print(instructions.table(results[name]))
    elif name == "floors":
        print(floors.table(results[name]))
    elif name == "concurrency":
        print(concurrency.table(results[name]))
    elif name == "endtoend" and results[name]:
        print(endtoend.table(results[name]))
    elif name == "scale":
        print(scale.tables(results[name]))
    print(f"   ({time.perf_counter() - started:.0f} s)\n", flush=True)


def report(results: dict[str, Any], settings: Settings) -> str:
    info = results["machine"]
    mode = "quick" if settings.quick else "full"
    lines = [
        f"# authsessions benchmarks ({mode} run)",
        "",
        f"- machine: {info['nproc']} cores, {info['cpu']}, shared with other work "
        f"(load average at start {info['load average']})",
        f"- Python {info['python']} on {info['platform']}; {info['packages']}",
        f"- authsessions at {info['commit']}",
        "",
    ]
    if "inprocess" in results:
        lines += [
            "## Per-request cost in process (median per request, ratio to the bare app)",
            "",
            f"{settings.inprocess_reps} repetitions x {settings.inprocess_batch} requests, "
            "in shuffled order, each batch beside as many of the bare app's, taking turns "
            f"every {settings.inprocess_chunk} requests (each run led in by "
            f"{settings.inprocess_lead_in} untimed requests); the ratio is the median of each "
            "batch's over the bare app's beside it.",
            "",
            inprocess.table(results["inprocess"]),
            "",
            "The same, as CPU time of the benchmark process (all its threads; a database "
            "server's work and waiting are left out), steadier on a shared machine:",
            "",
            inprocess.table(results["inprocess"], cpu=True),
            "",
        ]
    if results.get("instructions"):
        lines += [
            "## Instructions per request (callgrind; ratio to the bare app)",
            "",
            f"One batch of {results['instructions']['requests']} requests per variant and "
            "scenario after a warm-up, each variant in a process of its own; not moved by the "
            "machine's load or speed.",
            "",
            instructions.table(results["instructions"]),
            "",
        ]
    if "floors" in results:
        lines += ["## The store's own floor", "", floors.table(results["floors"]), ""]
    if "concurrency" in results:
        many = results["concurrency"]
        lines += [
            "## Many request streams at once (in process; requests/s, share of bare)",
            "",
            f"{many['streams']} streams of {many['requests']} sequential requests each, on "
            "one event loop, sharing one session (or user), then each with its own; the "
            "median over repetitions.",
            "",
            concurrency.table(many),
            "",
        ]
    if results.get("endtoend"):
        e2e = results["endtoend"]
        lines += [
            "## End to end (authenticated reads, wrk)",
            "",
            f"{e2e['server']}; wrk -t1 -c{e2e['connections']}, {e2e['rounds']} rounds, "
            f"{e2e['seconds']:g} s per variant in all.",
            "",
            endtoend.table(e2e),
            "",
        ]
    if "scale" in results:
        lines += ["## Scale", "", scale.tables(results["scale"]), ""]
    for part, error in results.get("errors", {}).items():
        lines += [f"**The {part} part failed:** `{error}`", ""]
    lines += ["## Targets", "", targets.section(results), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about 4 minutes")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    settings = Settings.for_mode(quick=args.quick)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "mode": "quick" if args.quick else "full"}
    print(f"machine: {results['machine']}\n", flush=True)
    kinds = available_store_kinds()
    try:
        for part in PARTS:
            if part in parts:
                run_part(part, settings, kinds, results)
    finally:
        asyncio.run(cleanup_services())
    text = report(results, settings)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    mode = results["mode"]
    (ARTIFACTS / f"report-{mode}.md").write_text(text, encoding="utf-8")
    (ARTIFACTS / f"results-{mode}.json").write_text(
        json.dumps(results, indent=2, default=str), encoding="utf-8"
    )
    if "scale" in results:
        path = (
            ARTIFACTS / "lookup_vs_sessions-quick.png"
            if args.quick
            else ROOT / "benchmarks" / "lookup_vs_sessions.png"
        )
        info = results["machine"]
        lookup_plot(
            results["scale"],
            path,
            subtitle=f"{info['nproc']}-core {info['cpu']}, shared; Python {info['python']}",
        )
        print(f"plot: {path}")
    print("== targets")
    print(targets.section(results))
    print(f"\nreport: {ARTIFACTS / f'report-{mode}.md'}")
    print(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
