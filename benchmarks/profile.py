"""Profile one variant and scenario of the in-process benchmark with pyinstrument.

    .venv/bin/python -m benchmarks.profile authsessions-sqlite read
    .venv/bin/python -m benchmarks.profile authsessions-postgres read --requests 5000

Prints pyinstrument's call tree of the requests alone (setup and warm-up excluded).
"""

from __future__ import annotations

import argparse
import asyncio

from benchmarks.asgi import drive
from benchmarks.common import cleanup_services
from benchmarks.inprocess import SCENARIOS, open_variant, validate


async def profile(variant_name: str, scenario: str, requests: int, interval: float) -> str:
    from pyinstrument import Profiler

    variant = await open_variant(variant_name)
    try:
        await validate(variant)
        scope = variant.scope(scenario)
        await drive(variant.app, scope, min(requests, 1000))
        profiler = Profiler(interval=interval, async_mode="disabled")
        profiler.start()
        await drive(variant.app, scope, requests)
        profiler.stop()
    finally:
        await variant.close()
        await cleanup_services()
    text: str = profiler.output_text(unicode=True, color=False, show_all=False)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", help="e.g. authsessions-sqlite, starlette-cookie, bare")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--interval", type=float, default=0.0001, help="sampling interval (s)")
    args = parser.parse_args()
    print(asyncio.run(profile(args.variant, args.scenario, args.requests, args.interval)))


if __name__ == "__main__":
    main()
