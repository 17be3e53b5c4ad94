"""The informational commands: list, show, validate."""

from __future__ import annotations

from tests.conftest import REPO, run_rex


def test_list_shows_components_with_their_summary():
    result = run_rex("list", "encoder")
    assert result.returncode == 0
    assert "encoder/transformer" in result.stdout and "encoder/mlp" in result.stdout
    assert "loss/bce" not in result.stdout
    models = run_rex("list", "model", env={"COLUMNS": "200"})
    # docstrings read as plain text: no reStructuredText backticks, brackets not taken as markup
    assert "``" not in models.stdout and ":meth:" not in models.stdout
    assert "field embeddings → [target attention over the history] → MLP" in models.stdout
    bad = run_rex("list", "encoders")
    assert bad.returncode == 2 and "kinds:" in bad.stderr


def test_show_prints_the_resolved_recipe_with_overrides():
    result = run_rex("show", "recipes/sasrec.yaml", "data.max_len=20", "model.encoder.num_layers=3")
    assert result.returncode == 0, result.stderr
    assert "max_len: 20" in result.stdout  # the interpolated model.max_len follows data.max_len
    assert "num_layers: 3" in result.stdout
    assert "${" not in result.stdout


def test_validate_passes_shipped_recipes_and_reports_schema_mismatch(data_home, tmp_path):
    result = run_rex("validate", "recipes/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(list((REPO / "recipes").glob("*.yaml")))

    (tmp_path / "base").symlink_to(REPO / "recipes" / "base")
    mismatch = tmp_path / "din_wrong_field.yaml"
    mismatch.write_text(
        (REPO / "recipes" / "din.yaml").read_text().replace("use_fields: [item]", "use_fields: [item, brand]")
    )
    result = run_rex("validate", str(mismatch))
    assert result.returncode == 2
    assert "use_fields ['brand'] are not in the dataset's fields" in result.stdout
    assert "din_wrong_field.yaml" in result.stdout
