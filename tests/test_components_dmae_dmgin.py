"""DMAE / DMGIN / din_mm components: shapes, gradients and one behavioural property each, plus
the item-feature plumbing of the datamodule on real prepared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rex.components.clustering.kmeans import BalancedKMeans
from rex.components.encoders.hierarchical import HierarchicalEncoder
from rex.components.encoders.modality_table import ModalityTable
from rex.components.encoders.sim_bucket import SimBucket
from rex.components.losses.reconstruction import InterestReconstruction
from rex.config.errors import RecipeError
from rex.config.recipe import load_recipe
from rex.config.registry import ComponentFactory, build, lookup
from rex.data.datamodule import RexDataModule
from rex.data.features import FEATURES_DIR
from rex.data.lance_io import read_columns
from rex.data.prepare import prepare_dataset
from rex.engine.build import build_run
from tests.conftest import REPO
from tests.test_components import assert_all_grads


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _features(num_items: int = 6, dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    dims = dims or {"text": 5, "image": 3}
    tables = {name: torch.randn(num_items, d) for name, d in dims.items()}
    for table in tables.values():
        table[0] = 0.0
    return tables


# --------------------------------------------------------------------------- encoder/modality_table


@pytest.mark.parametrize("finetune", [False, True])
def test_modality_table_shapes_and_grad(finetune: bool) -> None:
    table = ModalityTable(_features(), "text", dim=4, finetune=finetune)
    ids = torch.tensor([[0, 1, 5], [2, 2, 3]])
    out = table(ids)
    assert out.shape == (2, 3, 4)
    out.sum().backward()
    assert_all_grads(table)
    params = dict(table.named_parameters())
    assert ("table" in params) is finetune
    if finetune:
        assert params["table"].grad is not None and params["table"].grad[0].abs().sum() == 0


def test_modality_table_frozen_vectors_do_not_move_and_padding_feeds_zeros() -> None:
    features = _features()
    table = ModalityTable(features, "image", dim=4)
    torch.testing.assert_close(table.table, features["image"])
    assert "table" not in table.state_dict()  # read from the dataset, never from a checkpoint
    # id 0 feeds a zero vector: its output is exactly the projection's bias
    torch.testing.assert_close(table(torch.tensor([0]))[0], table.proj.bias)
    # same id, same output; the projection sees the pretrained row
    torch.testing.assert_close(table(torch.tensor([3]))[0], table.proj(features["image"][3]))


def test_modality_table_unknown_modality_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="'audio'.*image, text"):
        ModalityTable(_features(), "audio", dim=4)
    with pytest.raises(RecipeError, match="image, text"):
        build(
            {"_component_": "encoder/modality_table", "modality": "audio", "dim": 4},
            "model.text",
            {"item_features": _features()},
        )


def test_modality_table_is_built_from_context() -> None:
    built = build(
        {"_component_": "encoder/modality_table", "modality": "text", "dim": 4},
        "m",
        {"item_features": _features()},
    )
    assert isinstance(built, ModalityTable) and built.in_dim == 5


# --------------------------------------------------------------------------- encoder/sim_bucket


def test_sim_bucket_shapes_grad_and_masking() -> None:
    unit = SimBucket(dim=4, max_len=5, num_buckets=10)
    similarity = torch.rand(3, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    out = unit(similarity, mask)
    assert out.shape == (3, 5, 4)
    assert out[~mask].abs().sum() == 0
    out.sum().backward()
    assert_all_grads(unit)


def test_sim_bucket_maps_higher_similarity_to_higher_buckets_and_adds_recency() -> None:
    unit = SimBucket(dim=4, max_len=8, num_buckets=5)
    scores = torch.tensor([[0.0, 0.3, 0.6, 1.0]])
    assert unit.bucket(scores).tolist() == [[0, 1, 2, 4]]
    target = torch.tensor([[1.0, 0.0]])
    history = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    torch.testing.assert_close(SimBucket.similarity(target, history), torch.tensor([[1.0, 0.0, 0.5, 1.0]]))
    # equal scores at different positions differ by exactly their recency embeddings
    out = unit(torch.full((1, 4), 0.5), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out[0, 3] - out[0, 0], unit.recency.weight[0] - unit.recency.weight[3])


# --------------------------------------------------------------------------- cluster/kmeans


def test_balanced_kmeans_caps_cluster_sizes_and_is_deterministic() -> None:
    # 90 points around one centre and 10 around another: plain K-means would keep them 90 / 10
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(90, 3, generator=generator), torch.randn(10, 3, generator=generator) + 20])
    labels = BalancedKMeans(k=4, seed=1).fit(x)
    assert labels.shape == (100,) and labels.dtype == torch.long
    assert torch.bincount(labels, minlength=4).max() <= 25
    assert torch.equal(labels, BalancedKMeans(k=4, seed=1).fit(x))
    # the far cluster stays together
    assert labels[90:].unique().numel() == 1
    with pytest.raises(ValueError, match="N >= k"):
        BalancedKMeans(k=5).fit(torch.randn(3, 2))
    assert lookup("cluster/kmeans").target is BalancedKMeans


# --------------------------------------------------------------------------- encoder/hierarchical


def _transformer() -> ComponentFactory:
    """An ``encoder/transformer`` node as the parent receives it (dim supplied by the parent)."""
    return ComponentFactory(
        lookup("encoder/transformer"), {"num_layers": 1, "causal": False, "dropout": 0.0}, "t", {}
    )


def test_hierarchical_shapes_grad_and_group_mask() -> None:
    enc = HierarchicalEncoder(
        dim=8, num_groups=4, intra=_transformer(), inter=_transformer(), max_per_group=3
    )
    x = torch.randn(2, 6, 8)
    groups = torch.tensor([[0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, group_mask = enc(x.requires_grad_(), groups, mask)
    assert out.shape == (2, 4, 8) and group_mask.shape == (2, 4)
    # row 0 has one group (1); row 1 has groups 2, 3, 0 -- empty groups come first (left padding)
    assert group_mask.tolist() == [[False, False, False, True], [False, True, True, True]]
    assert out[~group_mask].abs().sum() == 0
    # Random weights: a plain sum of a LayerNorm's output has no gradient by construction.
    (out * torch.randn_like(out)).sum().backward()
    assert_all_grads(enc)
    # padding positions and items beyond a group's window get no gradient
    assert x.grad[0, :2].abs().sum() == 0 and x.grad[1, 0].abs().sum() == 0 and x.grad[1, 1].abs().sum() > 0


def test_hierarchical_group_vectors_depend_only_on_their_group_in_time_order() -> None:
    enc = HierarchicalEncoder(dim=8, num_groups=3, intra=_transformer(), inter=None, max_per_group=4).eval()
    x = torch.randn(1, 5, 8)
    groups = torch.tensor([[0, 1, 0, 2, 1]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    out, group_mask = enc(x, groups, mask)
    assert group_mask.all()
    # last occurrences: group 0 at position 2, group 2 at 3, group 1 at 4 -> slots [0, 2, 1]
    for position, slot in ((0, 0), (3, 1), (4, 2)):
        changed = x.clone()
        changed[0, position] += torch.randn(8)  # not a constant shift: LayerNorm removes those
        moved, _ = enc(changed, groups, mask)
        others = [s for s in range(3) if s != slot]
        assert not torch.allclose(moved[0, slot], out[0, slot])
        torch.testing.assert_close(moved[0, others], out[0, others])


# --------------------------------------------------------------------------- loss/interest_reconstruction


def test_reconstruction_loss_grad_and_minimum() -> None:
    loss = InterestReconstruction(temperature=0.5)
    target = torch.rand(3, 5, 2)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    logits = torch.randn(3, 5, 2, requires_grad=True)
    value = loss({"recon_logits": logits, "recon_target": target, "recon_mask": mask}, {})
    assert value.dim() == 0 and value > 0
    value.backward()
    assert (
        logits.grad is not None and logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0
    )
    # decoding the real distribution exactly (up to a constant per row) gives zero loss
    exact = loss({"recon_logits": target / 0.5 + 3.0, "recon_target": target, "recon_mask": mask}, {})
    assert exact.abs() < 1e-5
    with pytest.raises(ValueError):
        InterestReconstruction(temperature=0.0)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def home(data_home: Path) -> Path:
    """The session's data home (ml-100k prepared) plus scientific_mm.

    The MiniLM caches of the working copy's data/_features are copied in when present, so the
    real (slow) encoder runs only where they are missing; the vectors are the real ones either way.
    """
    cache = REPO / "data" / FEATURES_DIR
    if cache.is_dir():
        shutil.copytree(cache, data_home / FEATURES_DIR, dirs_exist_ok=True)
    prepare_dataset("scientific_mm", root=data_home)
    return data_home


def _datamodule(root: Path, recipe: str, *overrides: str) -> RexDataModule:
    loaded = load_recipe(REPO / "recipes" / recipe, list(overrides))
    return RexDataModule(loaded.recipe, root / loaded.recipe.data.name, seed=0)


def test_item_features_are_indexed_by_item_id_with_a_zero_padding_row(home: Path) -> None:
    dm = _datamodule(home, "din.yaml", "data.name=scientific_mm")
    features = dm.context()["item_features"]
    assert set(features) == {"text", "image", "text_minilm"}
    raw = read_columns(home / "scientific_mm" / "items.lance", ["item", "image", "text_minilm"])
    for name, dim in (("image", 512), ("text_minilm", 384)):
        table = features[name]
        assert table.shape == (1586, dim) and table.dtype == torch.float32
        assert table[0].abs().sum() == 0
        torch.testing.assert_close(table[torch.tensor(raw["item"])], torch.tensor(np.array(raw[name])))
    # MiniLM vectors are unit-norm: the rows are real embeddings, not zeros
    assert torch.allclose(features["text_minilm"][1:].norm(dim=1), torch.ones(1585), atol=1e-4)


def test_item_features_are_empty_without_vectors(data_home: Path) -> None:
    dm = _datamodule(data_home, "din.yaml")  # beauty: an items view of ids only
    assert dm.context()["item_features"] == {}


@pytest.mark.parametrize(
    ("recipe", "overrides", "new"),
    [
        ("dmae.yaml", [], ["units", "gate", "fused_interest", "decoder"]),
        ("dmgin.yaml", [], ["encoder", "group_embedding"]),
        ("din_mm.yaml", [], ["modality_tables"]),
        ("din_mm.yaml", ["data.name=ml-100k", "model.modalities=[text_minilm]"], ["modality_tables"]),
    ],
    ids=["dmae", "dmgin", "din_mm", "din_mm-ml-100k"],
)
def test_recipe_model_trains_every_new_component_on_a_real_batch(
    home: Path, recipe: str, overrides: list[str], new: list[str]
) -> None:
    loaded = load_recipe(REPO / "recipes" / recipe, ["train.batch_size=64", *overrides])
    built = build_run(loaded.recipe, 0, recipe)
    batch = next(iter(built.datamodule.loader("train")))
    module = built.module
    module.train()
    outputs = module.model(batch)
    total = sum(loss.weight * loss.module(outputs, batch) for loss in module.losses)
    assert torch.isfinite(total)
    total.backward()
    for name in new:
        component = getattr(module.model, name)
        assert sum(p.numel() for p in component.parameters()) > 0, name
        assert_all_grads(component)
    if recipe == "dmae.yaml":
        assert outputs["recon_logits"].shape == (*batch["history"].shape, 2)
        # the auto-encoder constraint is a real term of the objective, not a constant
        assert module.losses[1].module(outputs, batch) > 0


def test_ablation_switches_build_the_reduced_models(home: Path) -> None:
    def dmae(*overrides: str):
        return build_run(load_recipe(REPO / "recipes" / "dmae.yaml", list(overrides)).recipe, 0, "dmae")

    no_decoder = dmae("model.decoder=false")
    assert no_decoder.module.model.decoder is None and len(no_decoder.module.model.units) == 2
    assert no_decoder.skipped_losses == ["interest_reconstruction"]  # the constraint goes with it
    one_bucket = dmae("model.sim_bucket.num_buckets=1").module.model
    assert all(unit.buckets.num_embeddings == 1 for unit in one_bucket.units)
    assert one_bucket.decoder is not None
    dmgin = build_run(
        load_recipe(REPO / "recipes" / "dmgin.yaml", ["model.encoder.inter=null"]).recipe, 0, "dmgin"
    )
    assert dmgin.module.model.encoder.inter is None


def test_item_groups_are_cached_balanced_kmeans_of_the_minilm_vectors(home: Path) -> None:
    from rex.data.clusters import ClusterParams, cluster_paths, item_groups

    params = ClusterParams(k=10, iters=5)
    groups = item_groups(home / "ml-100k", params)
    assert groups.shape == (1683,) and groups[0] == 0
    assert np.bincount(groups[1:], minlength=10).max() <= -(-1682 // 10)
    array_path, key_path = cluster_paths("ml-100k", home)
    stamp = array_path.stat().st_mtime_ns
    assert np.array_equal(item_groups(home / "ml-100k", params), groups)
    assert array_path.stat().st_mtime_ns == stamp  # reused, not recomputed
    # items of one group are closer in MiniLM space than items of different groups
    vectors = read_columns(home / "ml-100k" / "items.lance", ["item", "text_minilm"])
    v = torch.as_tensor(np.asarray(vectors["text_minilm"]))
    g = torch.as_tensor(groups[np.asarray(vectors["item"])])
    sim = v @ v.T
    same = g[:, None] == g[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.05
