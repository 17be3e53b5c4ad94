"""Multi-objective two-tower retrieval: parameter counts and user-tower latency of each recipe.

For each recipe (the separate-towers, shared-bottom and MMoE baselines, and CSMF, whose model
is the shared-bottom one trained in cascade, timed as its last stage serves it), the model is built on real taobao_mb rows and its
fused query, ``user_vectors(batch)`` (the user tower, all objectives, weighted), is timed on one
thread over validation users: one user at a time (serving latency, median and p95) and 256 at a
time (per-user cost in a batch), in rounds over the recipes, keeping each figure's best round.
The item tower is not timed: its vectors are computed once and indexed. Untrained weights time
the same as trained ones.

    python benchmarks/two_tower.py            # table, and benchmarks/results/two_tower.json
    python benchmarks/two_tower.py --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "two_tower.json"
RECIPES = ("two_tower_separate", "two_tower_shared_bottom", "two_tower_mmoe", "csmf")


def build(recipe: str):  # type: ignore[no-untyped-def]
    """The recipe's model (its last stage's, as served, for a staged one) and 256 validation
    users."""
    from rex.config.recipe import load_recipe
    from rex.engine.build import build_run
    from rex.engine.stages import export_value

    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml", ["eval.batch_size=256"])
    if not loaded.stages:
        built = build_run(loaded.recipe, 0, recipe)
        return built.module.model.eval(), next(iter(built.datamodule.loader("valid")))
    # Each stage is built from the exports of the one before, as a run passes them on (CSMF: the
    # ownership its release frees), so the last stage's model is the served one: CSMF's earlier
    # objectives run the user heads with their own masks, one run per objective.
    context: dict = {}
    for stage in loaded.stages:
        built = build_run(stage.recipe, 0, recipe, context)
        for name, method in stage.config.export.items():
            context[name] = export_value(built, name, method)
    return built.module.model.eval(), next(iter(built.datamodule.loader("valid")))


def sizes(model) -> dict[str, int]:  # type: ignore[no-untyped-def]
    user = sum(p.numel() for tower in model.towers for p in tower.user.parameters())
    embeddings = sum(tower.embedding.weight.numel() for tower in model.towers)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "user_tower_parameters": user + embeddings,  # its MLPs and the item embeddings it pools
        "query_dim": int(model.item_vectors().shape[1]),
    }


def timings(model, batch, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds of the fused query for one user (p50, p95) and per user in batches of 256."""
    import torch

    out = {}
    with torch.no_grad():
        for size in (1, 256):
            model.user_vectors({name: value[:size] for name, value in batch.items()})  # warm-up
            times = []
            for i in range(repeats if size == 1 else max(repeats // 10, 5)):
                rows = {name: value[(i * size) % 256 :][:size] for name, value in batch.items()}
                start = time.perf_counter()
                model.user_vectors(rows)
                times.append(time.perf_counter() - start)
            if size == 1:
                out["latency_ms_p50"] = statistics.median(times) * 1e3
                out["latency_ms_p95"] = sorted(times)[int(0.95 * len(times)) - 1] * 1e3
            else:
                out["batch256_us_per_user"] = statistics.median(times) / size * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    built = {recipe: build(recipe) for recipe in RECIPES}
    rows = {recipe: sizes(model) for recipe, (model, _) in built.items()}
    # Rounds over the recipes in turn, keeping each figure's best round: other jobs on the
    # machine only ever add time, and taking turns spreads their bursts over every recipe.
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for recipe, (model, batch) in built.items():
            for name, value in timings(model, batch, args.repeats).items():
                best.setdefault(recipe, {})[name] = min(value, best.get(recipe, {}).get(name, value))
    for recipe in RECIPES:
        rows[recipe].update(best[recipe])
    header = (
        f"{'recipe':<26}{'params':>12}{'user tower':>12}{'D':>5}{'p50 ms':>9}{'p95 ms':>9}{'us/user@256':>13}"
    )
    print(header)
    for recipe, r in rows.items():
        print(
            f"{recipe:<26}{r['parameters']:>12,}{r['user_tower_parameters']:>12,}{r['query_dim']:>5}"
            f"{r['latency_ms_p50']:>9.3f}{r['latency_ms_p95']:>9.3f}{r['batch256_us_per_user']:>13.1f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread",
                "torch": torch.__version__,
                "repeats": args.repeats,
                "rounds": args.rounds,
                # Other jobs share the machine: the 1-minute load average when it finished.
                "load_average": os.getloadavg()[0],
                "recipes": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
