#!/usr/bin/env python3
"""Set up and run the project with nothing but Python 3.11+.

    python3 scripts/dev.py demo     # the demo app on http://127.0.0.1:8000 (embedded SQLite)
    python3 scripts/dev.py test     # the whole test suite (extra arguments go to pytest)
    python3 scripts/dev.py check    # ruff and mypy (strict)

The first run creates .venv/ and installs the project into it; later runs
reinstall only when pyproject.toml changes. $AUTHSESSIONS_VENV names another
folder, for the same tasks under another Python:

    AUTHSESSIONS_VENV=.venv-3.13 python3.13 scripts/dev.py test
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / os.environ.get("AUTHSESSIONS_VENV", ".venv")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# check type-checks the benchmarks too, which import the peers they compare with.
EXTRAS = {"demo": "cli", "test": "test", "check": "test,bench"}


def ensure_environment(extra: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may be run by an older python3
        sys.exit(f"authsessions needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
    if not (BIN / "python").exists():
        print(f"Creating {VENV.name}/ …", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    stamp = VENV / f".installed-{extra}-{hashlib.sha256(pyproject).hexdigest()[:16]}"
    if stamp.exists():
        return
    print(f"Installing authsessions[{extra}] into {VENV.name}/ …", flush=True)
    run([BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    run([BIN / "python", "-m", "pip", "install", "--quiet", "--editable", f".[{extra}]"])
    stamp.touch()


def run(command: list[str | Path]) -> None:
    completed = subprocess.run(command, cwd=ROOT, check=False)  # noqa: S603
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def main() -> None:
    task, *args = sys.argv[1:] or ["help"]
    if task not in EXTRAS:
        sys.exit(__doc__)
    ensure_environment(EXTRAS[task])
    if task == "demo":
        run([BIN / "authsessions", "demo", *args])
    elif task == "test":
        run([BIN / "python", "-m", "pytest", *args])
    else:
        run([BIN / "ruff", "check", "src", "tests", "benchmarks", "scripts"])
        run([BIN / "ruff", "format", "--check", "src", "tests", "benchmarks", "scripts"])
        run([BIN / "mypy"])


if __name__ == "__main__":
    main()
