"""Cross-attention, noise schedules, the conditional and synergy denoisers, and the epsilon-MSE.

Shapes and gradients use random tensors; the denoising check trains the conditional denoiser
on scientific_mm's real shipped 512-d text and image item vectors, read from the mirror archive.
"""

from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from rex.components.attention.cross import CrossAttention
from rex.components.denoisers.conditional import ConditionalDenoiser
from rex.components.denoisers.schedule import NoiseSchedule
from rex.components.denoisers.synergy import SynergyDenoiser
from rex.components.losses.diffusion import EpsilonMSE
from rex.data.mirror import mirror_dir
from tests.test_components import assert_all_grads


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _open_gates(module: nn.Module, value: float = 0.5) -> None:
    """Zero-initialised residual gates block the gradient to what they gate; open them."""
    for name, param in module.named_parameters():
        if name.endswith("gamma"):
            param.data.fill_(value)


# --------------------------------------------------------------------------- attention/cross


def test_cross_attention_shapes_grads_and_mask() -> None:
    attn = CrossAttention(8, num_heads=2, gated=True)
    _open_gates(attn)
    x, cond = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 5])
    out = attn(x, cond, mask)
    assert out.shape == (3, 4, 8) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert_all_grads(attn)
    # An all-padding condition contributes nothing: the row is x itself.
    torch.testing.assert_close(out[2], x[2])
    # Masked condition positions do not matter.
    changed = cond.clone()
    changed[1, :2] = 100.0
    torch.testing.assert_close(attn(x, changed, mask)[1], out[1])
    assert attn(x[:, 0], cond[:, 0]).shape == (3, 8)


def test_gated_cross_attention_starts_as_identity() -> None:
    attn = CrossAttention(8, gated=True)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(attn(x, torch.randn(2, 6, 8)), x)
    plain = CrossAttention(8, gated=False)
    assert not torch.allclose(plain(x, torch.randn(2, 6, 8)), x)
    with pytest.raises(ValueError):
        CrossAttention(6, num_heads=4)


# --------------------------------------------------------------------------- denoiser/schedule


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_alpha_bar_is_monotone_and_q_sample_matches_closed_form(kind: str) -> None:
    schedule = NoiseSchedule(100, kind)  # type: ignore[arg-type]
    a = schedule.alpha_bars
    assert a[0] == 1 and (a[1:] < a[:-1]).all() and a[-1] > 0
    torch.testing.assert_close(a[1:], torch.cumprod(1 - schedule.betas[1:], 0))
    x0, noise, t = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([1, 10, 50, 100])
    expected = a[t].sqrt()[:, None] * x0 + (1 - a[t]).sqrt()[:, None] * noise
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), expected)
    torch.testing.assert_close(schedule.predict_x0(expected, t, noise), x0, atol=1e-4, rtol=1e-4)


def test_cosine_schedule_follows_nichol_dhariwal_and_posterior_step_is_exact_with_true_noise() -> None:
    schedule = NoiseSchedule(10, "cosine")
    f = lambda t: math.cos((t / 10 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert schedule.alpha_bars[5].item() == pytest.approx(f(5) / f(0), rel=1e-5)
    # With the true noise, one posterior step from x_t lands on the posterior mean of x_{t-1}.
    x0, noise, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([4, 4, 4])
    x_t = schedule.q_sample(x0, t, noise)
    a_bar, a_prev, beta = schedule.alpha_bars[4], schedule.alpha_bars[3], schedule.betas[4]
    mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x_t) / (1 - a_bar)
    torch.testing.assert_close(schedule.step(x_t, t, noise), mean, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        NoiseSchedule(0)


# --------------------------------------------------------------------------- denoiser/conditional


def test_conditional_denoiser_shapes_grads_and_zero_steps() -> None:
    model = ConditionalDenoiser(8, steps=20, reverse_steps=3, train_samples=2)
    x, cond = torch.randn(4, 5, 8, requires_grad=True), torch.randn(4, 3, 8)
    x_mask = torch.ones(4, 5, dtype=torch.bool)
    x_mask[0, :2] = False
    out, eps, pred = model(x, cond, torch.ones(4, 3, dtype=torch.bool), x_mask)
    assert out.shape == (4, 5, 8)
    assert eps.shape == pred.shape == (2 * 18, 8)  # 2 samples of the 18 real positions
    (out.sum() + EpsilonMSE()({"eps": eps, "eps_pred": pred}, {})).backward()
    assert_all_grads(model)
    assert x.grad is not None
    off = ConditionalDenoiser(8, steps=20, reverse_steps=0)
    torch.testing.assert_close(off(x, cond)[0], x)
    with pytest.raises(ValueError):
        ConditionalDenoiser(8, steps=5, reverse_steps=6)


def _scientific_vectors() -> tuple[torch.Tensor, torch.Tensor]:
    """scientific_mm's shipped text (feat1CLS) and image (feat3CLS) vectors, 1,585 x 512 each."""
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("no data mirror (../shared/data or REX_DATA_MIRROR)")
    arrays = {}
    with tarfile.open(mirror / "amazon_scientific_mm_decorec.tar.xz") as tar:
        for member in tar.getmembers():
            for suffix in ("feat1CLS", "feat3CLS"):
                if member.name.endswith(f"Scientific.{suffix}"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    arrays[suffix] = np.frombuffer(handle.read(), dtype=np.float32).reshape(-1, 512)
    text, image = (torch.from_numpy(arrays[s].copy()) for s in ("feat1CLS", "feat3CLS"))
    assert text.shape == image.shape == (1585, 512)
    return text, image


def test_conditional_denoiser_trained_on_real_item_vectors_removes_noise() -> None:
    text, image = _scientific_vectors()
    # A fixed random projection to 32-d, standardised, keeps the test fast; item i's text vector
    # is denoised with its image vector as the condition.
    proj = torch.randn(512, 32, generator=torch.Generator().manual_seed(1)) / math.sqrt(512)
    x, cond = text @ proj, image @ proj
    x, cond = (x - x.mean(0)) / x.std(0), (cond - cond.mean(0)) / cond.std(0)
    train, held = torch.arange(0, 1400), torch.arange(1400, 1585)
    model = ConditionalDenoiser(32, steps=50, train_samples=4, hidden=128)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        rows = train[torch.randint(0, len(train), (128,))]
        _, eps, pred = model(x[rows], cond[rows, None])
        loss = EpsilonMSE()({"eps": eps, "eps_pred": pred}, {})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    t = 25  # alpha-bar about 0.5: half signal, half noise
    steps = torch.full((len(held),), t)
    noised = model.schedule.q_sample(x[held], steps, torch.randn(len(held), 32))
    with torch.no_grad():
        denoised = model.denoise(noised, cond[held, None], start=t)
    # The noised input is scaled by sqrt(alpha-bar_t); the fair baseline is the best rescaling.
    baseline = (noised / model.schedule.alpha_bars[t].sqrt() - x[held]).pow(2).mean()
    raw = (noised - x[held]).pow(2).mean()
    after = (denoised - x[held]).pow(2).mean()
    assert after < 0.85 * min(baseline, raw), (float(after), float(baseline), float(raw))


# --------------------------------------------------------------------------- denoiser/synergy


def test_synergy_denoiser_shapes_grads_and_deterministic_eval() -> None:
    model = SynergyDenoiser(8, num_streams=3, steps=3, num_heads=2)
    _open_gates(model)
    streams = torch.randn(2, 3, 4, 8)
    mask = torch.tensor([[True] * 4, [False, True, True, True]])
    h_syn, eps, pred = model(streams, mask)
    assert h_syn.shape == (2, 4, 8)
    assert eps.shape == pred.shape == (3 * 3 * 7, 8)  # steps x streams x real positions
    (h_syn.sum() + EpsilonMSE()({"eps": eps, "eps_pred": pred}, {})).backward()
    assert_all_grads(model)
    assert len(model.attention) == 6 and model.gates.shape == (6,)
    model.eval()
    torch.testing.assert_close(model(streams, mask)[0], model(streams, mask)[0])
    assert model(streams[:, :, 0])[0].shape == (2, 8)
    with pytest.raises(ValueError):
        model(torch.randn(2, 2, 4, 8))


def test_synergy_with_perfect_noise_prediction_recovers_each_stream() -> None:
    """Each round inverts its own forward step: with the predicted noise equal to the drawn
    noise, the streams come back unchanged whatever the number of rounds."""
    model = SynergyDenoiser(4, num_streams=2, steps=5)
    streams = torch.randn(3, 2, 1, 4)
    schedule = model.schedule
    h = streams
    for step in range(1, 6):
        noise = torch.randn_like(h)
        x = schedule.alphas[step].sqrt() * h + schedule.betas[step].sqrt() * noise
        h = (x - schedule.betas[step].sqrt() * noise) / schedule.alphas[step].sqrt()
    torch.testing.assert_close(h, streams, atol=1e-5, rtol=1e-5)
    assert schedule.kind == "cosine"
