"""The GPU path, checked on CPU: ``train.compile``, bf16 autocast and ``benchmarks/gpu.py``.

Nothing here needs a GPU: Lightning runs bf16-mixed autocast on CPU too, and torch.compile
compiles for the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.module import RexModule
from rex.engine.train import train
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "deepfm.yaml"  # the smallest real recipe: ml-100k, an MLP tower
SMOKE = [
    "train.max_epochs=1",
    "train.limit_train_batches=2",
    "train.limit_eval_batches=2",
    "logging.progress_bar=false",
]


def _module(compile_model: bool) -> tuple[RexModule, dict[str, torch.Tensor]]:
    """DeepFM as its recipe builds it (seed 42), and the first batch of its training data."""
    recipe = load_recipe(RECIPE, [f"train.compile={str(compile_model).lower()}"]).recipe
    built = build_run(recipe, 42, str(RECIPE))
    return built.module, next(iter(built.datamodule.loader("train")))


def test_a_compiled_model_gives_the_eager_outputs_under_the_same_state_dict_keys(data_home):
    eager, batch = _module(compile_model=False)
    compiled, _ = _module(compile_model=True)
    compiled.configure_model()  # what Lightning calls: the recipe key's path, with inductor
    compiled.configure_model()  # a second fit or test compiles nothing again
    # An eager model's weights load into the compiled one under the very same keys.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    traced: list[bool] = []
    compiled.model.tower.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        expected, got = eager(batch)["logit"], compiled(batch)["logit"]
    assert traced == [True]  # the model ran as dynamo traced it, not eagerly
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_compiled_bf16_run_trains_and_its_checkpoint_loads_into_an_eager_model(
    data_home, tmp_path, monkeypatch
):
    compiled: list[nn.Module] = []
    compile_in_place = nn.Module.compile

    def compile_cheaply(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        # aot_eager captures the graphs and their backward as inductor does but generates no
        # code, which takes inductor ~30 s per graph on 2 cores; the test above runs inductor.
        compiled.append(self)
        compile_in_place(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(nn.Module, "compile", compile_cheaply)
    overrides = [*SMOKE, "train.precision=bf16-mixed", "train.compile=true", f"logging.run_root={tmp_path}"]
    run_dir = train(RECIPE, overrides)

    assert len(compiled) == 1  # the model, once for the fit and the test
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_steps"] == 2
    assert all(math.isfinite(v) for v in metrics["test"].values())
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    eager, _ = _module(compile_model=False)
    eager.load_state_dict(checkpoint["state_dict"])  # strict: no key renamed by compiling


def _benchmark() -> ModuleType:
    # benchmarks/ is not a package: load the script as a module, as the test of a script.
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", None),
    ],
)
def test_the_benchmark_knows_the_bf16_peak_of_a_gpu_by_its_name(name, peak):
    assert _benchmark().peak_tflops(name) == peak


def test_the_gpu_benchmark_runs_on_cpu(data_home, tmp_path: Path):
    out = tmp_path / "gpu.json"
    args = ["--model", "deepfm", "--precision", "32", "--compile", "off", "--warmup", "1", "--steps", "2"]
    _benchmark().main([*args, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] and report["versions"]["torch"] == torch.__version__ and report["date"]
    (row,) = report["results"]
    assert row["model"] == "deepfm" and row["samples"] == 2 * 1024
    assert row["samples_per_s"] > 0 and row["dense_gflop_per_step"] > 0
    if not torch.cuda.is_available():
        assert row["bf16_peak_share"] is None
