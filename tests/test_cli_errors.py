"""Bad input through the real CLI: 1-3 lines naming file and key, exit code 2, no traceback."""

from __future__ import annotations

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
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


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
