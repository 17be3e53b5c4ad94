"""Training end to end on real data: every recipe, run folders, seeds, resume, eval."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rex.config.errors import RexError
from rex.config.recipe import load_recipe, recipe_files
from rex.engine.train import evaluate, train
from tests.conftest import REPO, run_rex

SMOKE = [
    "train.max_epochs=1",
    "train.limit_train_batches=3",
    "train.limit_eval_batches=2",
    "logging.progress_bar=false",
]


@pytest.mark.parametrize("recipe", recipe_files([str(REPO / "recipes")]), ids=lambda p: p.stem)
def test_every_recipe_trains_and_tests_on_a_slice_of_its_data(recipe, data_home, tmp_path):
    # A stage's own train settings win over the recipe's, so a staged smoke run caps each stage.
    loaded = load_recipe(recipe)
    names = [s.name for s in loaded.stages]
    # Two batches of 256 users rank as well as two of 1,024 do, at a quarter of the beam searches.
    users = ["eval.batch_size=256"] if loaded.recipe.task == "next_item" else []
    run_dir = train(
        recipe,
        [*SMOKE, *users, *(f"stages.{n}.train.max_epochs=1" for n in names), f"logging.run_root={tmp_path}"],
    )
    assert run_dir.parent == tmp_path / recipe.stem
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validation"] and metrics["test"]
    assert all(math.isfinite(v) for v in metrics["test"].values())
    assert (run_dir / "recipe.yaml").is_file()
    last_stage = run_dir / names[-1] if names else run_dir
    assert (last_stage / "checkpoints" / "best.ckpt").is_file()
    env = json.loads((last_stage / "env.json").read_text())
    assert env["torch"].startswith("2.13") and len(env["data_hash"]) == 64


def test_eval_reproduces_the_run_test_metrics(data_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default, relative run root
    run_dir = train(REPO / "recipes" / "deepfm.yaml", SMOKE)
    assert run_dir.is_relative_to(tmp_path / "runs" / "deepfm")
    written = json.loads((run_dir / "metrics.json").read_text())["test"]
    again = evaluate(run_dir)
    assert again == pytest.approx(written, abs=1e-6)
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == written  # written once
    # Without best.ckpt, eval refuses rather than testing another checkpoint unasked...
    (run_dir / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(RexError, match=r"best.ckpt: no best.ckpt .* pass .*last.ckpt"):
        evaluate(run_dir)
    # ...and tests last.ckpt when it is given.
    assert set(evaluate(run_dir / "checkpoints" / "last.ckpt")) == set(written)


def test_several_seeds_report_mean_and_std(data_home, tmp_path):
    root = train(REPO / "recipes" / "deepfm.yaml", [*SMOKE, f"logging.run_root={tmp_path}"], seeds=2)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["seeds"] == [42, 43]
    auc = summary["test"]["auc"]
    assert len(auc["values"]) == 2 and auc["values"][0] != auc["values"][1]
    assert auc["mean"] == pytest.approx(sum(auc["values"]) / 2)
    assert auc["std"] > 0


RESUME_ARGS = [
    "recipes/sasrec.yaml",
    "model.dim=32",
    "train.max_epochs=2",
    "train.batch_size=128",
    "train.limit_train_batches=24",
    "train.checkpoint_every_n_steps=4",
    "train.limit_eval_batches=2",
    "eval.batch_size=2048",
    "logging.progress_bar=false",
]


def test_killed_run_resumes_to_the_same_test_metrics(data_home, tmp_path):
    reference = run_rex("train", *RESUME_ARGS, f"logging.run_root={tmp_path / 'straight'}")
    assert reference.returncode == 0, reference.stderr
    (straight_dir,) = (tmp_path / "straight" / "sasrec").iterdir()
    expected = json.loads((straight_dir / "metrics.json").read_text())["test"]

    env = {**os.environ, "WANDB_MODE": "disabled"}
    child = subprocess.Popen(
        [sys.executable, "-m", "rex.cli", "train", *RESUME_ARGS, f"logging.run_root={tmp_path / 'killed'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline and child.poll() is None:
        found = list((tmp_path / "killed").glob("sasrec/*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert last is not None, "the run ended before its first mid-epoch checkpoint"
    killed_dir = last.parent.parent
    state = torch.load(last, weights_only=True)
    done = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert 0 < done < 24, f"the kill should land mid-epoch, checkpoint is at batch {done}"
    assert not (killed_dir / "metrics.json").exists() or "test" not in json.loads(
        (killed_dir / "metrics.json").read_text()
    )

    resumed = run_rex("train", "--resume", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((killed_dir / "metrics.json").read_text())["test"]
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name
    # The CSV log keeps the epochs before the kill, and the killed epoch's mean training loss
    # covers its steps before the kill too, as in the uninterrupted run.
    straight_losses, resumed_losses = _epoch_losses(straight_dir), _epoch_losses(killed_dir)
    assert sorted(straight_losses) == sorted(resumed_losses) == [0, 1]
    for epoch, loss in straight_losses.items():
        assert resumed_losses[epoch] == pytest.approx(loss, rel=1e-5), epoch


def _epoch_losses(run_dir) -> dict[int, float]:
    """epoch → train/loss_epoch over every CSV log of a run (a resume adds a version)."""
    losses = {}
    for log in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        rows = list(csv.DictReader(log.open()))
        for row in rows:
            if row.get("train/loss_epoch"):
                losses[int(row["epoch"])] = float(row["train/loss_epoch"])
    return losses


def test_resume_refuses_a_finished_run_and_a_non_run(tmp_path, data_home):
    result = run_rex("train", "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a run folder" in result.stderr


def test_no_step_checkpoint_claims_an_epoch_whose_validation_has_not_run(data_home, tmp_path):
    # Lightning resumes a checkpoint taken after an epoch's last batch as if its validation had
    # run. So the step checkpoint on disk when validation starts must be from an earlier batch:
    # a kill during validation then resumes to re-run the last batch and the validation.
    from lightning.pytorch.callbacks import Callback

    from rex.engine.train import run_one

    seen: list[int] = []

    class AtValidationStart(Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            state = torch.load(next(tmp_path.glob("checkpoints/last.ckpt")), weights_only=True)
            seen.append(state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"])

    loaded = load_recipe(REPO / "recipes" / "deepfm.yaml", [*SMOKE, "train.checkpoint_every_n_steps=1"])
    run_one(loaded, 42, tmp_path, extra_callbacks=[AtValidationStart()], test=False)
    batches = loaded.recipe.train.limit_train_batches
    assert seen and all(processed < batches for processed in seen), (seen, batches)
