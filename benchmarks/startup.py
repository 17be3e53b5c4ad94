"""Start-up time of the informational commands (`rex --help`, `rex list`, `rex show`).

Each command runs as a fresh process, as a user types it, ``--repeat`` times; the table gives
the median wall and CPU seconds and the heaviest modules it imported. Results go to
``benchmarks/results/startup.json``.

    python benchmarks/startup.py
    python benchmarks/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "startup.json"
COMMANDS = {
    "rex --help": ["--help"],
    "rex list": ["list"],
    "rex show recipes/deepfm.yaml": ["show", "recipes/deepfm.yaml"],
}
# Imports whose presence explains a slow start: torch and Lightning cost seconds.
HEAVY = ("torch", "lightning", "optuna", "lance", "pyarrow", "sentence_transformers")


def timed(args: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one ``python -m rex.cli ARGS`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rex.cli", *args], cwd=REPO, capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(args: list[str]) -> list[str]:
    """Which of the heavy packages the command imports (from ``-X importtime``)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rex.cli", *args], cwd=REPO, capture_output=True, text=True
    )
    top = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    return [name for name in HEAVY if name in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for label, argv in COMMANDS.items():
        runs = [timed(argv) for _ in range(args.repeat)]
        rows.append(
            {
                "command": label,
                "wall_s": round(statistics.median(w for w, _ in runs), 3),
                "cpu_s": round(statistics.median(c for _, c in runs), 3),
                "imports": heavy_imports(argv),
            }
        )
    print(f"{'command':<32}{'wall s':>8}{'cpu s':>8}  heavy imports")
    for row in rows:
        print(
            f"{row['command']:<32}{row['wall_s']:>8.2f}{row['cpu_s']:>8.2f}  {', '.join(row['imports']) or '-'}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "rows": rows,
        "repeat": args.repeat,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average": os.getloadavg(),
    }
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(OUT)
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
