"""Bad input through the real CLI: 1-3 lines naming file and key, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_rex

SASREC = (REPO / "recipes" / "sasrec.yaml").read_text()


def recipe_in(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    shutil.copytree(REPO / "recipes" / "base", tmp_path / "base", dirs_exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_clean_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        pytest.param(
            ("num_layers: 2", "nmu_layers: 2"),
            ["bad.yaml", "model.encoder.nmu_layers", "did you mean num_layers"],
            id="unknown-key-deep",
        ),
        pytest.param(
            ("train: {lr", "trian: {lr"), ["bad.yaml", "trian", "did you mean train"], id="unknown-key-top"
        ),
        pytest.param(
            ("encoder/transformer", "encoder/transfomer"),
            ["bad.yaml", "model.encoder._component_", "did you mean encoder/transformer"],
            id="unknown-component",
        ),
        pytest.param(
            ("dim: 64", "dim: sixty-four"), ["bad.yaml", "model.dim", "expected int"], id="wrong-type"
        ),
        pytest.param(
            ("  encoder: {_component_: encoder/transformer", "  # encoder: {"),
            ["bad.yaml", "model", "missing required argument encoder"],
            id="missing-argument",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: beauty"),
            ["bad.yaml", "YAML syntax error at line"],
            id="yaml-syntax",
        ),
    ],
)
def test_bad_recipe(tmp_path, data_home, edit, fragments):
    old, new = edit
    assert old in SASREC
    path = recipe_in(tmp_path, SASREC.replace(old, new))
    assert_clean_error(run_rex("train", str(path)), *fragments)


def test_bad_override_path(data_home):
    result = run_rex("train", "recipes/sasrec.yaml", "trian.max_epochs=5")
    assert_clean_error(result, "command-line override", "trian.max_epochs", "did you mean train")


def test_bad_cli_flag():
    result = run_rex("train", "recipes/sasrec.yaml", "--epochs", "3")
    assert_clean_error(result, "No such option: --epochs", "rex train --help")


def test_missing_data_mirror(tmp_path):
    env = {"REX_DATA_MIRROR": str(tmp_path / "no-mirror"), "REX_DATA_HOME": str(tmp_path / "data")}
    result = run_rex("train", "recipes/sasrec.yaml", f"logging.run_root={tmp_path / 'runs'}", env=env)
    assert_clean_error(result, "no data mirror at", "REX_DATA_MIRROR")
    assert not (tmp_path / "data" / "beauty").exists()  # nothing half-built is left behind
    assert not list((tmp_path / "runs" / "sasrec").glob("*"))  # and no empty run folder


def test_corrupt_lance_table(tmp_path, data_home):
    home = tmp_path / "data"
    shutil.copytree(data_home / "beauty", home / "beauty")
    table = home / "beauty" / "seq_train.lance"
    for data_file in (table / "data").iterdir():
        data_file.write_bytes(b"not a lance file" * 4)
    result = run_rex(
        "train", "recipes/sasrec.yaml", f"logging.run_root={tmp_path}", env={"REX_DATA_HOME": str(home)}
    )
    assert_clean_error(result, "seq_train.lance", "rex data prepare")


def test_debug_mode_shows_the_traceback(tmp_path, data_home):
    path = recipe_in(tmp_path, SASREC.replace("dim: 64", "dim: big"))
    result = run_rex("train", str(path), env={"REX_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        pytest.param(
            ("num_layers: 2,", "num_layers: 2, dim: 32,"),
            ["bad.yaml", "model.encoder.dim", "given dim=64 by its parent", "remove this key"],
            id="child-size-contradicts-parent",
        ),
        pytest.param(
            ("  dim: 64", "  dim: 1000000000"),
            ["bad.yaml", "model", "needs more memory than this machine has", "lower its sizes"],
            id="size-beyond-the-machine",
        ),
        pytest.param(
            # Tensors an allocator would hand out one by one (14.5 GB for the item table), which
            # initialisation would then fill: refused before, from the meta-device shapes alone
            ("  dim: 64", "  dim: 300000"),
            ["bad.yaml", "model", "needs about", "GB available", "largest parameter is model.encoder"],
            id="size-that-allocates-but-cannot-train",
        ),
        pytest.param(("lr: 1.0e-3", "lr: .inf"), ["bad.yaml", "train.lr", "finite number"], id="infinite-lr"),
        pytest.param(
            ("  _component_: model/sequential\n", ""),
            ["bad.yaml", "model", "add _component_"],
            id="model-without-component",
        ),
        pytest.param(
            ("encoder: {_component_: encoder/transformer, ", "encoder: {"),
            ["bad.yaml", "model.encoder", "takes a component here", "_component_"],
            id="child-without-component",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: beauty}\nplugins: [.evil]"),
            ["bad.yaml", "plugins[0]", "not an absolute module name"],
            id="relative-plugin",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: beauty}\nplugins: ['']"),
            ["bad.yaml", "plugins[0]", "not an absolute module name"],
            id="empty-plugin",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: beauty}\nplugins: [os]"),
            ["bad.yaml", "plugins[0]", "'os' registers no component"],
            id="plugin-registering-nothing",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: nosuchdata}"),
            ["bad.yaml: data.name: unknown dataset 'nosuchdata'"],
            id="unknown-dataset",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: beauty}\ndescription: '${oc.env:HOME}'"),
            ["bad.yaml: description", "cannot read environment variables"],
            id="environment-read",
        ),
        pytest.param(
            ("data: {name: beauty}", "data: {name: ':x: [bold]no'}"),
            ["unknown dataset ':x: [bold]no'"],  # user text is printed as written
            id="user-text-literal",
        ),
    ],
)
def test_bad_recipe_caught_before_training(tmp_path, data_home, edit, fragments):
    old, new = edit
    assert old in SASREC
    path = recipe_in(tmp_path, SASREC.replace(old, new))
    runs = tmp_path / "runs"
    assert_clean_error(run_rex("train", str(path), f"logging.run_root={runs}"), *fragments)
    assert not runs.exists() or not list(runs.rglob("*.json"))  # nothing was trained or written


def test_an_argument_a_component_rejects_is_named_by_its_full_key(tmp_path, data_home):
    path = recipe_in(tmp_path, SASREC.replace("num_heads: 2,", "num_heads: 0,"))
    result = run_rex("train", str(path))
    # the component built inside its parent is named, not the parent
    assert_clean_error(result, "bad.yaml: model.encoder: encoder/transformer", "num_heads")


def test_a_plugin_that_fails_to_import_names_the_recipe(tmp_path, data_home):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    path = recipe_in(
        tmp_path, SASREC.replace("data: {name: beauty}", "data: {name: beauty}\nplugins: [broken_plugin]")
    )
    result = run_rex("train", str(path), env={"PYTHONPATH": str(tmp_path)})
    assert_clean_error(
        result, "bad.yaml", "plugins[0]", "failed while importing: RuntimeError: boom at import"
    )


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert_clean_error(run_rex("train", str(path)), "latin1.yaml", "not UTF-8", "save it as UTF-8")


def test_a_loss_gone_nan_stops_the_run_and_marks_its_folder_failed(tmp_path, data_home):
    runs = tmp_path / "runs"
    result = run_rex(
        "train",
        "recipes/deepfm.yaml",
        "train.lr=1e30",
        "train.max_epochs=1",
        "train.limit_train_batches=5",
        f"logging.run_root={runs}",
    )
    assert_clean_error(result, "recipes/deepfm.yaml: train:", "training loss became nan", "lower train.lr")
    (metrics,) = runs.rglob("metrics.json")
    assert "training loss became nan" in json.loads(metrics.read_text())["failed"]
