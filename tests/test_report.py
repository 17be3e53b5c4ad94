"""``rex report`` on a small real sweep: table, PNG plots, one self-contained HTML page that
renders in headless Chromium, and the W&B publish path mocked at the wandb client."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rex.eval.report import publish_wandb, report
from rex.sweep.study import sweep
from tests.test_sweep import SPEC as WORKER_SPEC

# The worker test's tiny DeepFM study, with its own name, budget and seeds and default heartbeats.
SPEC = {
    **{k: v for k, v in WORKER_SPEC.items() if k not in ("heartbeat_interval", "grace_period")},
    "name": "tiny",
    "overrides": [
        "train.max_epochs=3",
        *(o for o in WORKER_SPEC["overrides"] if not o.startswith("train.max_epochs=")),
    ],
    "sampler": {"type": "random", "seed": 3},
    "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    "trials": 4,
    "seeds": 2,  # per trial: the objective is the mean of the two seeds' best validation AUC
    "test_seeds": 2,
}


@pytest.fixture(scope="module")
def sweep_dir(data_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec = root / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        return sweep(spec, [f"logging.run_root={root / 'runs'}"])
    finally:
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous


@pytest.fixture(scope="module")
def made(sweep_dir, tmp_path_factory):
    return report([sweep_dir], tmp_path_factory.mktemp("out"))


def test_report_writes_table_plots_and_page(made):
    assert len(made.plots) >= 3 and all(p.stat().st_size > 5_000 for p in made.plots)
    names = {p.stem for p in made.plots}
    assert {"validation_curves", "tiny_optimization_history", "tiny_param_importances"} <= names
    rows = list(csv.DictReader(made.csv.open()))
    trials = [r for r in rows if r["split"] == "val"]
    tested = [r for r in rows if r["split"] == "test"]
    assert len(trials) >= 2 and len(tested) == 1
    assert all(r["recipe"] == "deepfm" and r["dataset"] == "ml-100k" for r in rows)
    assert float(tested[0]["auc_std"]) > 0  # two seeds: mean ± std
    assert "train.lr=" in trials[0]["parameters_that_differ"]
    assert float(trials[0]["wall_time_s"]) > 0 and float(trials[0]["samples_per_s"]) > 0
    md = made.markdown.read_text()
    assert re.search(r"\| tiny best → test \|[^\n]*\d\.\d{4} ± \d\.\d{4}", md)
    page = made.html.read_text()
    assert page.count('src="data:image/png;base64,') == len(made.plots)
    assert "<img" in page and 'src="http' not in page and "file://" not in page  # self-contained
    first = re.search(r'base64,([^"]+)"', page).group(1)
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("chromium is missing in CI (.ci/run installs it)")
    return found


def test_page_renders_in_headless_chromium(made, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = made.html.resolve().as_uri()
    laptop = "--window-size=1280,800"
    dom = subprocess.run([*flags, laptop, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    # The page's own script counts the images that decoded once the page loaded...
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stderr[-1000:]
    assert loaded.group(1) == loaded.group(2) == str(len(made.plots))
    # ...and measures the page: at a laptop's width nothing is cut off, the table scrolls in its box.
    width = re.search(r'data-page-width="(\d+)"', dom.stdout)
    assert width and int(width.group(1)) <= 1280, dom.stdout[-500:]
    shot = made.folder / "screenshot.png"
    subprocess.run(
        [*flags, "--window-size=1400,2400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 2400)
    colours = image.resize((140, 240)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 50  # a table and plots, not a blank page


def test_wandb_publish_sends_the_same_comparison(made, monkeypatch):
    import wandb

    calls = {}

    class FakeRun:
        name = "report-run"
        entity = "me"

        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    def fake_init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    import wandb_workspaces.reports.v2 as wr

    def fake_save(page, draft=False, clone=False):  # the Reports API client boundary
        calls["report"] = page
        return page

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wr.Report, "save", fake_save)
    monkeypatch.setattr(wr.Report, "url", property(lambda page: "https://wandb.example/report"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert publish_wandb(made, "rex-test") == "online"
    assert calls["init"]["project"] == "rex-test" and calls["init"]["job_type"] == "report"
    table = calls["log"]["comparison"]
    assert table.columns == made.columns and len(table.data) == len(made.cells)
    assert {k for k in calls["log"] if k.startswith("plots/")} == {f"plots/{p.stem}" for p in made.plots}
    assert calls["finished"]
    page = calls["report"]  # the W&B Report: the same table, then the run's plots
    markdown, grid = page.blocks
    assert all(cell in markdown.text for cell in made.cells[0])
    assert page.entity == grid.runsets[0].entity == "me" and grid.runsets[0].name == "report-run"
    assert set(grid.panels[0].media_keys) == {f"plots/{p.stem}" for p in made.plots}

    calls.clear()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert publish_wandb(made, "rex-test") == "disabled" and not calls


def test_trials_average_their_seeds(sweep_dir):
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert done and summary["counts"]["COMPLETE"] + summary["counts"].get("PRUNED", 0) == 4
    for trial in done:
        runs = [
            json.loads((Path(trial["run_dir"]) / f"seed-{s}" / "metrics.json").read_text()) for s in (42, 43)
        ]
        scores = [r["best"]["score"] for r in runs]
        assert scores[0] != scores[1]
        assert trial["value"] == pytest.approx(sum(scores) / 2)
        assert all("test" not in r for r in runs)


def test_one_run_reads_plainly(data_home, tmp_path):
    from rex.engine.train import train
    from tests.conftest import REPO

    run = train(
        REPO / "recipes" / "deepfm.yaml",
        ["train.max_epochs=2", "train.limit_train_batches=3", f"logging.run_root={tmp_path}"],
    )
    made = report([run], tmp_path / "out")
    page = made.html.read_text()
    assert "1 row from" in page and "1 rows" not in page
    assert "state" not in made.columns  # empty outside a sweep, so not shown
    assert "samples/s" in made.columns and "a sample is one supervised prediction" in page
