"""Data-parallel runs (Lightning DDP, gloo on CPU) give the single-process results.

The multi-process tests start real processes the way a user does: ``rex eval --devices 2``
and a training script that Lightning's launcher re-runs as rank 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rex.data.loader import BatchLoader, Ragged, shard_batches, shard_count
from rex.engine.train import train
from tests.conftest import REPO, run_rex

SHARDS_SCRIPT = Path(__file__).with_name("ddp_shards.py")


@pytest.mark.parametrize(
    ("rows", "batch_size", "world_size"),
    [(11, 5, 2), (10, 5, 2), (3, 5, 2), (100, 7, 3), (9, 1, 4), (64, 8, 4)],
)
def test_each_row_goes_to_one_process_and_every_process_runs_the_same_steps(rows, batch_size, world_size):
    batches = list(torch.randperm(rows, generator=torch.Generator().manual_seed(0)).split(batch_size))
    shares = [shard_batches(batches, rank, world_size) for rank in range(world_size)]
    assert {len(share) for share in shares} == {shard_count(len(batches), world_size)}
    served = torch.cat([torch.cat(share) for share in shares])
    assert sorted(served.tolist()) == list(range(rows))
    assert all(len(batch) for share in shares for batch in share)


def test_a_sharded_loader_serves_its_share_of_the_same_epoch_order():
    lists = Ragged(torch.arange(1, 31), torch.arange(0, 31, 3), max_len=3)  # 10 rows of 3 ids
    columns = {"row": torch.arange(10), "history": lists}
    whole = BatchLoader(columns, batch_size=3, shuffle=True, seed=7)
    whole.sampler.set_epoch(2)
    unsharded = [batch["row"] for batch in whole]
    shares = []
    for rank in (0, 1):
        loader = BatchLoader(columns, batch_size=3, shuffle=True, seed=7)
        loader.shard(rank, 2)
        loader.sampler.set_epoch(2)
        shares.append([batch for batch in loader])
        assert len(shares[-1]) == len(loader) == 2
    # 4 batches: rank 0 runs the epoch's first and third, rank 1 its second and fourth.
    assert torch.equal(shares[0][0]["row"], unsharded[0]) and torch.equal(shares[1][0]["row"], unsharded[1])
    rows = torch.cat([batch["row"] for share in shares for batch in share])
    assert sorted(rows.tolist()) == list(range(10))
    for share in shares:  # each row keeps its own list
        for batch in share:
            assert torch.equal(batch["history"][:, -1], 3 * batch["row"] + 3)
    with pytest.raises(ValueError, match="3 rows cannot be shared by 4 processes"):
        BatchLoader({"row": torch.arange(3)}, batch_size=1).shard(0, 4)


def test_sample_budget_batches_are_shared_the_same_way():
    """train.batch_samples: batches of about n positions each, dealt to processes whole."""
    weights = torch.randint(1, 40, (57,), generator=torch.Generator().manual_seed(3))
    columns = {"row": torch.arange(57)}
    shares = []
    for rank in (0, 1, 2):
        loader = BatchLoader(columns, batch_size=1, shuffle=True, seed=5, budget=(weights, 100))
        loader.shard(rank, 3)
        loader.sampler.set_epoch(1)
        shares.append([batch["row"] for batch in loader])
    assert len({len(share) for share in shares}) == 1
    rows = torch.cat([torch.cat(share) for share in shares])
    assert sorted(rows.tolist()) == list(range(57))


def _eval(run_dir: Path, devices: int, out: Path) -> dict[str, float]:
    done = run_rex("eval", str(run_dir), "--devices", str(devices), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        # 943 test users: an odd split, in 5 batches of 200 (the last one short).
        ("sasrec.yaml", ["data.name=ml-100k", "eval.batch_size=200", "model.encoder.num_layers=1"]),
        # CTR rows in 7 batches: two processes cannot share the batches evenly.
        ("deepfm.yaml", ["eval.batch_size=3001"]),
    ],
)
def test_two_process_evaluation_equals_one_process(recipe, overrides, data_home, tmp_path):
    smoke = ["train.max_epochs=1", "train.limit_train_batches=3", f"logging.run_root={tmp_path}"]
    run_dir = train(REPO / "recipes" / recipe, [*smoke, *overrides])
    one = _eval(run_dir, 1, tmp_path / "one.json")
    two = _eval(run_dir, 2, tmp_path / "two.json")
    assert set(one) == set(two) and one
    for name, value in one.items():
        if name in ("auc", "gauc", "logloss"):
            assert two[name] == pytest.approx(value, abs=1e-6), name
        else:  # ranks are integers: their means agree exactly
            assert two[name] == value, name


def _launch(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A multi-process command run to completion, as a user starts it; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("REX_RUN_DIR", None)  # each test's processes agree on their own folder
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_training_splits_each_epoch_between_the_processes(data_home, tmp_path):
    """DeepFM for one epoch on 2 CPU processes: the ranks' batches are disjoint and cover it."""
    _launch([sys.executable, str(SHARDS_SCRIPT), str(tmp_path)])
    seen = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    expected = torch.load(tmp_path / "epoch.pt", weights_only=True)
    assert len(expected) == len(set(expected.tolist())), "row keys must be unique for this check"
    assert len(seen[0]["batches"]) == len(seen[1]["batches"]) > 1
    rows = [torch.cat(rank["batches"]) for rank in seen]
    assert not set(rows[0].tolist()) & set(rows[1].tolist())
    assert sorted(torch.cat(rows).tolist()) == sorted(expected.tolist())
    # Both processes wrote into one run folder, and only one of them wrote its records.
    (run_dir,) = (tmp_path / "runs" / "deepfm").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and "test" in metrics


DDP_RESUME_ARGS = [
    str(REPO / "recipes" / "deepfm.yaml"),
    "train.devices=2",
    "train.accelerator=cpu",
    "train.max_epochs=2",
    "train.batch_size=1024",
    "train.checkpoint_every_n_steps=3",
    "train.limit_eval_batches=4",
    "logging.progress_bar=false",
]


def test_a_killed_two_process_run_resumes_with_two_processes_only(data_home, tmp_path):
    reference = run_rex("train", *DDP_RESUME_ARGS, f"logging.run_root={tmp_path / 'straight'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    (straight_dir,) = (tmp_path / "straight" / "deepfm").iterdir()
    expected = json.loads((straight_dir / "metrics.json").read_text())["test"]

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("REX_RUN_DIR", None)
    # Its own process group: the kill takes the process Lightning started beside it too.
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rex.cli",
            "train",
            *DDP_RESUME_ARGS,
            f"logging.run_root={tmp_path / 'killed'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline and child.poll() is None:
        found = list((tmp_path / "killed").glob("deepfm/*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert last is not None, "the run ended before its first mid-epoch checkpoint"
    killed_dir = last.parent.parent
    position = torch.load(last, weights_only=True)["RexDataModule"]
    assert position["processes"] == 2 and position["mid_epoch"], position

    # Another world size would split the interrupted epoch differently: refused, nothing lost.
    recipe_file = killed_dir / "recipe.yaml"
    written = recipe_file.read_text()
    recipe_file.write_text(written.replace("devices: 2", "devices: 1"))
    refused = run_rex("train", "--resume", str(killed_dir))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "stopped mid-epoch in a run of 2 process(es)" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert last.is_file()

    recipe_file.write_text(written)
    resumed = run_rex("train", "--resume", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((killed_dir / "metrics.json").read_text())["test"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name


def test_torchrun_processes_share_one_run_folder_named_by_the_job(data_home, tmp_path):
    """torchrun starts both processes itself; they agree on runs/<recipe>/job-<rdzv id>."""
    done = _launch(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "rex.cli",
            "train",
            str(REPO / "recipes" / "deepfm.yaml"),
            "train.devices=2",
            "train.accelerator=cpu",
            "train.max_epochs=1",
            "train.limit_train_batches=4",
            "train.limit_eval_batches=2",
            "logging.progress_bar=false",
            f"logging.run_root={tmp_path}",
        ]
    )
    (run_dir,) = (tmp_path / "deepfm").iterdir()
    assert run_dir.name.startswith("job-")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and set(metrics["test"]) == {"auc", "gauc", "logloss"}
    assert done.stdout.count("run folder:") == 1  # the summary is printed once, by rank 0
