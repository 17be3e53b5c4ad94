"""LREA's serving cost against full target attention, per candidate, at long history lengths.

For each history length L (100, 1,000 and 10,000; synthetic histories, which is fine for
timing), users with N candidates each are scored three ways, on one thread:

- ``din``: DIN's target attention (``attention/target``: an MLP over every (item, candidate)
  pair), the full-sequence baseline of ``recipes/din_long.yaml``;
- ``dot``: scaled dot-product target attention over all L items, the cheapest full attention;
- ``lrea``: LREA's absorbed path (``attention/low_rank``): each user's state is pre-stored once
  (timed separately, per user), then each candidate costs two (rank × d) products.

Each method and length runs in a fresh process, so its peak RSS (the growth over the process's
RSS before scoring) is its own. The AUC cost on real data comes from the results table's
LREA and DIN-full rows (``scripts/results.py``, 3 seeds), when they have been run.

    python benchmarks/lrea.py                  # table, and benchmarks/results/lrea.json
    python benchmarks/lrea.py --lengths 100 1000 --candidates 256
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "lrea.json"
RESULTS = REPO / "runs" / "results"
DIM = 16  # the item embedding width of recipes/lrea.yaml and recipes/din_long.yaml
RANK = 16
METHODS = ("din", "dot", "lrea")


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure(method: str, length: int, users: int, candidates: int, chunk: int) -> dict[str, float]:
    """One method at one length, in this process: seconds per candidate (and per user for
    LREA's pre-stored state), and the peak RSS growth while scoring."""
    import torch

    from rex.components.attention.low_rank import LowRankTargetAttention
    from rex.components.attention.target import TargetAttention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    history = torch.randn(users, length, DIM)
    mask = torch.ones(users, length, dtype=torch.bool)
    targets = torch.randn(users, candidates, DIM)
    before = _rss_mb()
    per_user = 0.0
    with torch.no_grad():
        if method == "lrea":
            attention = LowRankTargetAttention(DIM, max_len=length, rank=RANK).eval()
            start = time.perf_counter()
            state = attention.user_state(history, mask)
            per_user = (time.perf_counter() - start) / users
            start = time.perf_counter()
            attention.serve(state, targets)
        elif method == "dot":
            start = time.perf_counter()
            for u in range(users):
                scores = (targets[u] @ history[u].T / DIM**0.5).softmax(dim=-1)
                scores @ history[u]
        else:
            din = TargetAttention(DIM, hidden=[80, 40], activation="dice", softmax=True).eval()
            start = time.perf_counter()
            # Candidates in chunks: all of them at once would expand the history N times over.
            for u in range(users):
                for part in targets[u].split(chunk):
                    rows = len(part)
                    din(part, history[u].expand(rows, -1, -1), mask[u].expand(rows, -1))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "us_per_candidate": 1e6 * seconds / (users * candidates),
        "us_per_user_state": 1e6 * per_user,
        "peak_rss_growth_mb": max(peak - before, 0.0),
    }


def auc_cost() -> dict[str, object] | None:
    """Test AUC of LREA and DIN over the full history from the results runs, when both exist."""
    rows = {}
    for label, folder in (("lrea", "lrea"), ("din_full", "din-full-history")):
        # scripts/results.py's layout: <section>/<entry>/<recipe>/<timestamp>/summary.json
        summaries = sorted((RESULTS / "ml-100k-long" / folder).glob("*/*/summary.json"))
        if not summaries:
            return None
        stats = json.loads(summaries[-1].read_text())["test"]["auc"]
        rows[label] = {"mean": stats["mean"], "std": stats["std"], "seeds": len(stats["values"])}
    difference = rows["din_full"]["mean"] - rows["lrea"]["mean"]
    return {**rows, "auc_below_din_full": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=512, help="candidates scored per user")
    parser.add_argument("--chunk", type=int, default=32, help="DIN: candidates expanded at once")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one measurement, printed as JSON
        method, length = args.one[0], int(args.one[1])
        print(json.dumps(measure(method, length, args.users, args.candidates, args.chunk)))
        return
    rows = []
    for length in args.lengths:
        for method in METHODS:
            child = subprocess.run(
                [sys.executable, __file__, "--one", method, str(length), "--users", str(args.users),
                 "--candidates", str(args.candidates), "--chunk", str(args.chunk)],
                capture_output=True, text=True, check=True, cwd=REPO,
            )  # fmt: skip
            rows.append({"method": method, "length": length, **json.loads(child.stdout.splitlines()[-1])})
    speedups = {}
    print(f"{'L':>6} {'method':>6} {'µs/candidate':>13} {'µs/user state':>14} {'peak RSS +MB':>13}")
    for row in rows:
        state = f"{row['us_per_user_state']:.1f}" if row["method"] == "lrea" else "-"
        print(
            f"{row['length']:>6} {row['method']:>6} {row['us_per_candidate']:>13.2f} {state:>14} "
            f"{row['peak_rss_growth_mb']:>13.1f}"
        )
    for length in args.lengths:
        by = {r["method"]: r["us_per_candidate"] for r in rows if r["length"] == length}
        speedups[str(length)] = {"vs_din": by["din"] / by["lrea"], "vs_dot": by["dot"] / by["lrea"]}
        print(
            f"L={length}: LREA is {by['din'] / by['lrea']:.0f}× DIN and {by['dot'] / by['lrea']:.1f}× dot-product per candidate"
        )
    cost = auc_cost()
    if cost is None:
        print("AUC cost: run `python scripts/results.py --only ml-100k-long` first")
    else:
        print(
            f"AUC cost on ml-100k long histories: {cost['auc_below_din_full']:+.4f} below DIN, full history"
        )
    result = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "users": args.users,
        "candidates_per_user": args.candidates,
        "dim": DIM,
        "rank": RANK,
        "rows": rows,
        "speedup_per_candidate": speedups,
        "auc_cost": cost,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
