"""DGenCTR (arXiv:2508.14500): the absorbing-state corruption, the masked-diffusion loss and
model/dgenctr on random tensors; then recipes/dgenctr.yaml on real Frappe: stage 2 starts from
stage 1's weights (and the ablation from its own), and a kill in the last stage resumes to the same
final metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.denoisers.absorbing import AbsorbingCorruption
from rex.components.embeddings.field import FieldEmbedding
from rex.components.encoders.transformer import TransformerEncoder
from rex.components.losses.diffusion import MaskedDiffusionLoss
from rex.components.models.dgenctr import DGenCTR
from rex.config.recipe import load_recipe
from rex.engine.build import build_run
from rex.engine.runs import load_checkpoint
from rex.engine.stages import copy_modules
from rex.engine.train import train
from tests.conftest import REPO, kill_rex_when, run_rex
from tests.test_components import assert_all_grads

RECIPE = REPO / "recipes" / "dgenctr.yaml"
FIELDS = {"user": 7, "item": 11, "city": 4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- denoiser/absorbing


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_corruption_masks_the_expected_fraction_of_fields_at_each_t(schedule: str) -> None:
    corruption = AbsorbingCorruption(schedule=schedule)
    rows, length = 40_000, 11
    x0 = torch.randint(0, 5, (rows, length))
    for value in (0.05, 0.2, 0.5, 0.8, 0.95, 1.0):
        expected = value if schedule == "linear" else 1 - math.cos(value * math.pi / 2)
        _, masked, t = corruption(x0, torch.full((length,), 9), torch.full((rows,), value))
        assert torch.equal(t, torch.full((rows,), value))
        # Each field on its own: every column's share is the rate, within 5 standard errors of a
        # binomial over 40,000 rows (at most 0.0125), and the whole table's within 0.004.
        tolerance = 5 * math.sqrt(max(expected * (1 - expected), 1e-12) / rows)
        per_field = masked.float().mean(0)
        assert (per_field - expected).abs().max() <= tolerance + 1e-9, (value, per_field)
        assert abs(masked.float().mean().item() - expected) <= tolerance / math.sqrt(length) + 1e-9
        if 0 < expected < 1:
            # Independent fields: the masks of two columns are uncorrelated.
            a, b = masked[:, 0].float(), masked[:, 1].float()
            covariance = (a * b).mean() - a.mean() * b.mean()
            assert abs(covariance) <= 5 * expected * (1 - expected) / math.sqrt(rows)


def test_corruption_replaces_exactly_the_masked_tokens_and_draws_t_in_0_1() -> None:
    corruption = AbsorbingCorruption()
    x0 = torch.randn(6, 5, 3, requires_grad=True)
    mask_token = torch.randn(5, 3, requires_grad=True)
    x_t, masked, t = corruption(x0, mask_token)
    assert (
        x_t.shape == (6, 5, 3) and masked.shape == (6, 5) and masked.dtype == torch.bool and t.shape == (6,)
    )
    torch.testing.assert_close(x_t[masked], mask_token.expand(6, 5, 3)[masked])
    torch.testing.assert_close(x_t[~masked], x0[~masked])
    x_t.sum().backward()
    assert x0.grad is not None and mask_token.grad is not None
    assert torch.equal(x0.grad[..., 0] == 1, ~masked)
    # Ids work the same way; t = 1 masks everything.
    ids, every, _ = corruption(torch.randint(0, 4, (3, 5)), torch.full((5,), 7), torch.ones(3))
    assert every.all() and (ids == 7).all()
    # t ~ U(0, 1]: never 0, mean 1/2; min_t raises the floor.
    t = corruption.sample_t(100_000)
    assert t.min() > 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.005
    assert AbsorbingCorruption(min_t=0.3).sample_t(10_000).min() >= 0.3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_elbo_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule: str) -> None:
    corruption = AbsorbingCorruption(schedule=schedule)
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    h = 1e-6

    def alpha(s: Tensor) -> Tensor:
        return 1 - corruption.rate(s)

    derivative = (alpha(t + h) - alpha(t - h)) / (2 * h)
    torch.testing.assert_close(corruption.elbo_weight(t), -derivative / (1 - alpha(t)))
    if schedule == "linear":
        torch.testing.assert_close(corruption.elbo_weight(t), 1 / t)


def test_corruption_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule"):
        AbsorbingCorruption(schedule="square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_t"):
        AbsorbingCorruption(min_t=1.0)
    with pytest.raises(ValueError, match="x0"):
        AbsorbingCorruption()(torch.zeros(4), torch.zeros(()))


# --------------------------------------------------------------------------- loss/masked_diffusion


def _loss_outputs() -> dict[str, Tensor]:
    masked = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    nll = torch.tensor([[1.0, 5.0, 3.0], [7.0, 9.0, 2.0], [4.0, 4.0, 4.0]], requires_grad=True)
    return {"restore_nll": nll, "restore_mask": masked, "restore_weight": torch.tensor([2.0, 4.0, 8.0])}


def test_loss_counts_masked_fields_only() -> None:
    outputs = _loss_outputs()
    uniform, elbo = MaskedDiffusionLoss(), MaskedDiffusionLoss(weighting="elbo")
    assert uniform(outputs, {}).item() == pytest.approx((1 + 3 + 2) / 3)
    assert elbo(outputs, {}).item() == pytest.approx((2 * (1 + 3) + 4 * 2 + 8 * 0) / 9)
    # Whatever the unmasked positions hold, even inf or nan, changes nothing.
    changed = dict(outputs)
    junk = outputs["restore_nll"].detach().clone()
    junk[~outputs["restore_mask"]] = torch.tensor([float("inf"), float("nan"), -3.0, 1e9, 0.0, 2.0])
    changed["restore_nll"] = junk
    assert uniform(changed, {}).item() == pytest.approx((1 + 3 + 2) / 3)
    assert elbo(changed, {}).item() == pytest.approx(16 / 9)
    # Gradient reaches the masked positions alone.
    for loss in (uniform, elbo):
        nll = outputs["restore_nll"]
        nll.grad = None
        loss(outputs, {}).backward()
        assert nll.grad is not None
        masked = outputs["restore_mask"]
        assert (nll.grad[masked] > 0).all() and (nll.grad[~masked] == 0).all()
    nothing = {**outputs, "restore_mask": torch.zeros(3, 3, dtype=torch.bool)}
    assert uniform(nothing, {}).item() == 0.0 and elbo(nothing, {}).item() == 0.0
    with pytest.raises(ValueError, match="weighting"):
        MaskedDiffusionLoss(weighting="t")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model/dgenctr


def _model(corruption: nn.Module | None = None, dropout: float = 0.0) -> DGenCTR:
    return DGenCTR(
        FIELDS,
        embed=lambda fields: FieldEmbedding(fields, dim=8),
        encoder=lambda dim: TransformerEncoder(dim, num_layers=2, num_heads=2, dropout=dropout, causal=False),
        corruption=(lambda: corruption) if corruption is not None else None,
    )


def _batch(rows: int = 32) -> dict[str, Tensor]:
    batch = {name: torch.randint(0, size, (rows,)) for name, size in FIELDS.items()}
    batch["label"] = torch.randint(0, 2, (rows,)).float()
    return batch


class _Fixed(nn.Module):
    """A corruption that masks the given (L,) positions of every row, weight 1."""

    def __init__(self, positions: Tensor) -> None:
        super().__init__()
        self.positions = positions

    def forward(self, x0: Tensor, mask_token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        masked = self.positions.expand(x0.shape[0], -1)
        return torch.where(masked[..., None], mask_token, x0), masked, torch.ones(x0.shape[0])

    def elbo_weight(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


def test_pretraining_outputs_shapes_gradients_and_scores_masked_fields_only() -> None:
    model = _model(AbsorbingCorruption(), dropout=0.1)
    assert model.outputs == {"logit", "restore_nll", "restore_mask", "restore_weight"}
    batch = _batch(64)
    model.train()
    out = model(batch)
    assert out["restore_nll"].shape == out["restore_mask"].shape == (64, len(FIELDS) + 1)
    assert out["restore_weight"].shape == (64,)
    masked = out["restore_mask"]
    assert masked.any() and (~masked).any()
    assert (out["restore_nll"][~masked] == 0).all() and (out["restore_nll"][masked] > 0).all()
    MaskedDiffusionLoss()(out, batch).backward()
    assert_all_grads(model)
    model.eval()
    logit = model(batch)["logit"]
    assert logit.shape == (64,) and torch.isfinite(logit).all()


def test_bf16_autocast_gives_float32_restoration_and_a_finite_loss() -> None:
    model = _model(AbsorbingCorruption())
    batch = _batch(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        out = model(batch)
        model.eval()
        logit = model(batch)["logit"]
    assert out["restore_nll"].dtype == torch.float32
    assert torch.isfinite(MaskedDiffusionLoss()(out, batch)) and torch.isfinite(logit).all()


def test_restoration_is_a_softmax_over_the_fields_own_tied_rows() -> None:
    # Mask the item field and the label; check one row's item NLL by hand.
    positions = torch.tensor([False, True, False, True])
    model = _model(_Fixed(positions))
    model.train()
    batch = _batch(5)
    out = model(batch)
    assert torch.equal(out["restore_mask"], positions.expand(5, -1))
    tokens = model.embed(batch)
    label = model.label_embedding(batch["label"].long())[:, None]
    noisy = torch.where(positions[None, :, None], model.mask_tokens, torch.cat([tokens, label], 1))
    hidden = model.encoder(noisy)
    rows = model.embed.lookup("item", torch.arange(FIELDS["item"]))
    scores = hidden[:, 1] @ rows.T + model.output_bias[1]
    torch.testing.assert_close(
        out["restore_nll"][:, 1], F.cross_entropy(scores, batch["item"], reduction="none")
    )


def test_the_label_only_masked_objective_is_the_fine_tuning_bce() -> None:
    # DGenCTR's unity of the two stages: restoring the masked label with every feature visible is
    # the CTR question, and its 2-way cross-entropy is the BCE of the fine-tuning logit.
    positions = torch.tensor([False, False, False, True])
    model = _model(_Fixed(positions))
    batch = _batch(16)
    model.train()
    restore = model(batch)["restore_nll"][:, -1]
    model.eval()
    logit = model(batch)["logit"]
    torch.testing.assert_close(
        restore, F.binary_cross_entropy_with_logits(logit, batch["label"], reduction="none")
    )


def test_fine_tuning_never_reads_the_label_and_trains_the_label_head() -> None:
    model = _model()
    assert model.outputs == {"logit"}
    batch = _batch(32)
    model.train()
    logit = model(batch)["logit"]
    flipped = {**batch, "label": 1 - batch["label"]}
    torch.testing.assert_close(model(flipped)["logit"], logit)
    F.binary_cross_entropy_with_logits(logit, batch["label"]).backward()
    # The features, the encoder, the label's mask token and output rows learn; what only
    # pre-training scores (the fields' output biases, their mask tokens) has nothing to learn from.
    for name, param in model.named_parameters():
        if name.startswith("output_bias.") and name != f"output_bias.{len(FIELDS)}":
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.mask_tokens.grad is not None
    assert (model.mask_tokens.grad[:-1] == 0).all() and (model.mask_tokens.grad[-1] != 0).any()


def test_model_rejects_a_causal_encoder_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="bidirectional"):
        DGenCTR(
            FIELDS,
            embed=lambda fields: FieldEmbedding(fields, dim=8),
            encoder=lambda dim: TransformerEncoder(dim, num_heads=2, causal=True),
        )
    with pytest.raises(ValueError, match="use_fields"):
        DGenCTR(
            FIELDS,
            embed=lambda fields: FieldEmbedding(fields, dim=8),
            encoder=lambda dim: TransformerEncoder(dim, num_heads=2, causal=False),
            use_fields=["user", "zip"],
        )


# --------------------------------------------------------------------------- the recipe, on Frappe

# A few batches per stage and one validation batch.
TINY = [
    "train.batch_size=512",
    "train.limit_train_batches=3",
    "train.limit_eval_batches=1",
    "eval.batch_size=1024",
    "logging.progress_bar=false",
    "stages.pretrain.train.max_epochs=1",
    "stages.finetune.train.max_epochs=2",
]


@pytest.fixture(scope="module")
def staged_run(data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The first run prepares Frappe into the session's data home.
    return train(RECIPE, [*TINY, f"logging.run_root={tmp_path_factory.mktemp('runs')}"])


def _model_state(run_dir: Path, stage: str, checkpoint: str = "best") -> dict[str, Tensor]:
    state = load_checkpoint(run_dir / stage / "checkpoints" / f"{checkpoint}.ckpt")["state_dict"]
    return {name: value for name, value in state.items() if name.startswith("model.")}


def test_init_from_copies_every_model_tensor(staged_run: Path) -> None:
    pretrain, finetune = load_recipe(RECIPE, TINY).stages
    source = build_run(pretrain.recipe, seed=1, source="test").module.state_dict()
    target = build_run(finetune.recipe, seed=2, source="test")
    assert any(not torch.equal(source[n], v) for n, v in target.module.state_dict().items())
    copy_modules(source, target, finetune)
    after = target.module.state_dict()
    assert set(after) == set(source)
    assert all(torch.equal(after[name], source[name]) for name in after)


def test_stage_two_starts_from_stage_one_and_the_ablation_from_scratch(
    staged_run: Path, tmp_path: Path
) -> None:
    record = json.loads((staged_run / "stages.json").read_text())
    assert list(record["stages"]) == ["pretrain", "finetune"]
    final = _test_metrics(staged_run)
    assert set(final) == {"auc", "gauc", "logloss", "abundance"} and 0 < final["auc"] < 1
    assert set(record["stages"]["pretrain"]["test"]) == set(final)  # stage 1 answers the CTR question too
    pretrained = _model_state(staged_run, "pretrain")
    # What fine-tuning never gets a gradient for (the fields' output biases and mask tokens) is
    # stage 1's, bit for bit, in every fine-tuning checkpoint; the rest trained on.
    fields = len(load_recipe(RECIPE).stages[0].recipe.model["use_fields"])  # type: ignore[index]
    untouched = [f"model.output_bias.{i}" for i in range(fields)]
    for checkpoint in ("best", "last"):
        tuned = _model_state(staged_run, "finetune", checkpoint)
        assert set(tuned) == set(pretrained)
        for name in untouched:
            assert torch.equal(tuned[name], pretrained[name]) and pretrained[name].abs().sum() > 0, name
        assert torch.equal(tuned["model.mask_tokens"][:-1], pretrained["model.mask_tokens"][:-1])
    qkv = "model.encoder.blocks.0.qkv.weight"
    assert not torch.equal(_model_state(staged_run, "finetune")[qkv], pretrained[qkv])

    # The ablation, one key: the same model from its own initialisation (the biases stay 0).
    # --reuse-stages of the run above takes over its stage 1, never its stage 2: that one's
    # settings are the same but for where it starts.
    scratch = train(
        RECIPE,
        [*TINY, "stages.finetune.init_from=null", f"logging.run_root={tmp_path}"],
        reuse_stages=staged_run,
    )
    stages = json.loads((scratch / "stages.json").read_text())["stages"]
    assert {name: entry["status"] for name, entry in stages.items()} == {
        "pretrain": "reused",
        "finetune": "trained",
    }
    fresh = _model_state(scratch, "finetune")
    for name in untouched:
        assert (fresh[name] == 0).all(), name
    assert _test_metrics(scratch) != final


def _test_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())["test"]


def test_a_kill_in_the_last_stage_resumes_to_the_same_final_metrics(data_home: Path, tmp_path: Path) -> None:
    # Both runs take the same arguments; the killed one saves last.ckpt after every step of
    # stage 2 and dies at the first.
    args = [*TINY, "stages.finetune.train.checkpoint_every_n_steps=1", "stages.finetune.train.max_epochs=3"]
    whole = train(RECIPE, [*args, f"logging.run_root={tmp_path / 'whole'}"])
    killed = tmp_path / "killed"
    last = kill_rex_when(
        "train",
        str(RECIPE),
        *args,
        f"logging.run_root={killed}",
        root=killed,
        pattern="dgenctr/*/finetune/checkpoints/last.ckpt",
        timeout=500,
    )
    assert last is not None, "the run should have reached its last stage"
    run_dir = last.parents[2]
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert list(stages) == ["pretrain"] and not (run_dir / "metrics.json").exists()
    resumed = run_rex("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _test_metrics(run_dir) == pytest.approx(_test_metrics(whole), abs=1e-6)
