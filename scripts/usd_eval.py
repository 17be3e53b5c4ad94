"""USD decoding on a trained run: settings chosen on validation, then test with and without.

    python scripts/usd_eval.py RUN_DIR [STAGE] OUT.json

Loads RUN_DIR's best checkpoint (of STAGE, for a staged run such as tiger_beauty's
``collaborative`` or ``recommender``), evaluates the validation split without decoding and with
each ``decoding/usd`` setting of a small grid (17 for full ranking; 2 for beam search, which is
slow on CPU), keeps the setting of best validation ndcg@10, and tests both. Metrics: the paper's
@3 and @10. Nothing is written into the run folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import rex.builtins  # noqa: F401
from rex.config.recipe import load_recipe
from rex.config.registry import build
from rex.engine.build import build_run
from rex.engine.runs import load_checkpoint
from rex.engine.stages import stage_contexts
from rex.engine.train import distributed_trainer, quiet_lightning

METRICS = ["hit@3", "ndcg@3", "mrr@3", "hit@10", "ndcg@10", "mrr@10"]


def usd(k: int, mix: float, weight: float) -> dict[str, Any]:
    cluster = {"_component_": "cluster/kmeans", "k": k}
    return {"_component_": "decoding/usd", "cluster": cluster, "mix": mix, "entropy_weight": weight}


def main(run_dir: Path, stage_name: str | None, out: Path) -> None:
    quiet_lightning()
    whole = load_recipe(run_dir / "recipe.yaml")
    if stage_name:
        stage = next(s for s in whole.stages if s.name == stage_name)
        recipe, context = stage.recipe, stage_contexts(whole, run_dir)[stage_name]
        ckpt = run_dir / stage_name / "checkpoints" / "best.ckpt"
    else:
        recipe, context, ckpt = whole.recipe, None, run_dir / "checkpoints" / "best.ckpt"
    built = build_run(recipe, recipe.seeds[0], str(run_dir / "recipe.yaml"), context)
    built.module.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    base = dict(recipe.eval.evaluator or {})
    exclude = built.history_masking.exclude if built.history_masking else False
    if base["_component_"] == "eval/generative":
        grid = [usd(64, 0.0, 1.0), usd(64, 0.2, 1.0)]
    else:
        grid = [
            usd(k, mix, weight)
            for k in (256, 1024)
            for mix in (0.0, 0.2, 0.5)
            for weight in (-1.0, 0.0, 1.0)
            if (mix, weight) != (0.0, 0.0)
        ]

    def run(decoding: dict[str, Any] | None, split: str) -> dict[str, float]:
        node = {**base, **({"decoding": decoding} if decoding else {})}
        context = {"metrics": METRICS, "exclude_history": exclude}
        built.module.evaluator = build(node, "eval.evaluator", context)
        trainer = distributed_trainer(
            recipe,
            precision=recipe.train.precision,
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
        )
        evaluate = trainer.validate if split == "valid" else trainer.test
        result = evaluate(built.module, datamodule=built.datamodule, verbose=False)[0]
        named = {key.split("/", 1)[1]: float(value) for key, value in result.items()}
        return {name: named[name] for name in METRICS}

    rows = []
    for decoding in [None, *grid]:
        start = time.time()
        rows.append({"decoding": decoding, "valid": run(decoding, "valid")})
        print(decoding, rows[-1]["valid"]["ndcg@10"], f"{time.time() - start:.0f}s", flush=True)
    best = max(rows[1:], key=lambda row: row["valid"]["ndcg@10"])
    result = {
        "run": str(run_dir),
        "stage": stage_name,
        "grid": rows,
        "chosen": best["decoding"],
        "valid_plain": rows[0]["valid"],
        "valid_usd": best["valid"],
        "test_plain": run(None, "test"),
        "test_usd": run(best["decoding"], "test"),
    }
    out.write_text(json.dumps(result, indent=1))
    print("chosen", best["decoding"], "\nplain", result["test_plain"], "\nusd  ", result["test_usd"])


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), args[1] if len(args) == 3 else None, Path(args[-1]))
