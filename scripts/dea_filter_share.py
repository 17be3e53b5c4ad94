"""How much Dual Enhanced Attention's collapse filter drops in trained runs.

    python scripts/dea_filter_share.py RUN_SEED_DIR [...] [--batches 3]

For each run (a seed folder with recipe.yaml and checkpoints/best.ckpt) it loads the best
checkpoint, runs test batches, and prints the share of attention weights below the filter's
``threshold / F``: the pairs the filter removes. Near 0 means the ablation without the filter
changes almost nothing in that run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.runs import load_checkpoint


def dropped_share(run_dir: Path, batches: int) -> float:
    recipe = load_recipe(run_dir / "recipe.yaml").recipe
    built = build_run(recipe, recipe.seeds[0], str(run_dir / "recipe.yaml"), None)
    built.module.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["state_dict"])
    model = built.module.model.eval()
    threshold = model.interaction.threshold
    dropped, total = 0, 0
    softmax = torch.Tensor.softmax

    def counting(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        nonlocal dropped, total
        weights = softmax(tensor, *args, **kwargs)
        if weights.dim() == 4:  # (B, heads, F, F): the field attention's weights
            dropped += int((weights < threshold / weights.shape[-1]).sum())
            total += weights.numel()
        return weights

    built.datamodule.setup("test")
    torch.Tensor.softmax = counting  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            for index, batch in enumerate(built.datamodule.test_dataloader()):
                if index == batches:
                    break
                model(batch)
    finally:
        torch.Tensor.softmax = softmax  # type: ignore[method-assign]
    return dropped / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    for run_dir in args.runs:
        print(f"{run_dir}: {dropped_share(run_dir, args.batches):.2%} of attention weights dropped")


if __name__ == "__main__":
    main()
