"""Residual vector quantization (RQ-VAE / TIGER semantic IDs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.components.clustering.kmeans import BalancedKMeans
from rex.config.registry import register


@register("quantizer/residual")
class ResidualQuantizer(nn.Module):
    """``levels`` codebooks of ``codes`` vectors each, applied to successive residuals.

    ``forward(x: (B, dim)) -> (quantized (B, dim), codes (B, levels) long, loss scalar)``. Level
    ``l`` picks the nearest code to the residual ``r_l`` (``r_0 = x``, ``r_{l+1} = r_l - e_l``);
    ``quantized`` is the sum of the picked codes, passed straight through to ``x`` for the gradient.
    The loss sums over levels the codebook term ``|sg(r_l) - e_l|^2`` and the commitment term
    ``beta * |r_l - sg(e_l)|^2`` (means over the batch and features).

    In training, the first forward initialises each level's codebook by (balanced) k-means on that
    level's residuals of the batch, which must hold at least ``codes`` vectors; a code that no
    vector has picked for ``dead_after`` training steps is reset to a random residual of the
    current batch (``dead_after: null`` turns this off). ``usage`` (levels, codes) counts the picks
    of each code since it was last (re)set. Random draws use torch's global generator, so a run is
    deterministic given ``torch.manual_seed``. ``dim`` is normally supplied by the parent.
    """

    def __init__(
        self,
        dim: int,
        levels: int = 3,
        codes: int = 256,
        beta: float = 0.25,
        kmeans_iters: int = 10,
        dead_after: int | None = 100,
    ) -> None:
        super().__init__()
        at_least(1, dim=dim, levels=levels, codes=codes, kmeans_iters=kmeans_iters)
        if dead_after is not None:
            at_least(1, dead_after=dead_after)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.dim = dim
        self.levels = levels
        self.codes = codes
        self.beta = beta
        self.kmeans_iters = kmeans_iters
        self.dead_after = dead_after
        self.codebooks = nn.Parameter(torch.randn(levels, codes, dim) * dim**-0.5)
        # Buffers, so a resumed run neither re-initialises the codebooks nor forgets idle codes.
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(levels, codes, dtype=torch.long))
        self.register_buffer("usage", torch.zeros(levels, codes, dtype=torch.long))
        self.initialised: Tensor
        self.step: Tensor
        self.last_used: Tensor
        self.usage: Tensor

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, levels) long codes → (B, dim) sum of their code vectors."""
        if codes.shape[-1] != self.levels:
            raise ValueError(f"codes must have {self.levels} columns, got shape {tuple(codes.shape)}")
        levels = torch.arange(self.levels, device=codes.device)
        return self.codebooks[levels, codes].sum(-2)

    def soft(self, x: Tensor, temperature: float) -> Tensor:
        """(B, dim) → (B, dim) differentiable soft indexing: each level takes the softmax-weighted
        mean of its codes, weights ``softmax(-|r_l - e_k|^2 / temperature)``, and the next level
        sees what that leaves of the residual. Gradients reach ``x`` and every code, so a
        downstream loss can move which codes an item picks (MMQ's behaviour-aware fine-tuning);
        as ``temperature`` → 0 it tends to the hard quantization of :meth:`forward`. No state
        changes (no initialisation, no usage counts)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        residual = x
        out = torch.zeros_like(x)
        for book in self.codebooks:
            weights = torch.softmax(-torch.cdist(residual, book).square() / temperature, dim=-1)
            chosen = weights @ book
            out = out + chosen
            residual = residual - chosen
        return out

    def usage_share(self) -> Tensor:
        """(levels,) share of each level's codes picked at least once since they were last (re)set."""
        return (self.usage > 0).float().mean(1)

    @torch.no_grad()
    def _kmeans_init(self, level: int, residual: Tensor) -> None:
        if len(residual) < self.codes:
            raise ValueError(
                f"k-means initialisation needs a first training batch of at least codes={self.codes} "
                f"vectors, got {len(residual)}"
            )
        # BalancedKMeans seeds its own generator; drawing that seed from the global one keeps the
        # initialisation reproducible under torch.manual_seed. Balanced clusters start every code
        # with an equal share of the batch, so none starts dead.
        seed = int(torch.randint(2**31 - 1, ()).item())
        x = residual.detach().double().cpu()  # its capacity-constrained assignment is CPU code
        labels = BalancedKMeans(self.codes, iters=self.kmeans_iters, seed=seed).fit(x)
        sums = torch.zeros(self.codes, self.dim, dtype=x.dtype).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=self.codes).clamp_min(1)
        self.codebooks[level] = (sums / counts[:, None]).to(self.codebooks)

    @torch.no_grad()
    def _reseed_dead(self, level: int, residual: Tensor) -> None:
        assert self.dead_after is not None
        dead = torch.nonzero(self.step - self.last_used[level] >= self.dead_after).squeeze(1)
        if dead.numel() == 0:
            return
        n = len(residual)
        pick = torch.randperm(n)[: len(dead)] if len(dead) <= n else torch.randint(n, (len(dead),))
        self.codebooks[level, dead] = residual[pick.to(residual.device)].to(self.codebooks)
        self.last_used[level, dead] = self.step
        self.usage[level, dead] = 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) inputs, got shape {tuple(x.shape)}")
        train = self.training
        if train:
            self.step += 1
            if not self.initialised:
                self.last_used.fill_(int(self.step))  # idle time counts from the initialisation
        residual = x
        picked: list[Tensor] = []
        residuals: list[Tensor] = []
        codes: list[Tensor] = []
        loss = x.new_zeros(())
        for level in range(self.levels):
            if train and not self.initialised:
                self._kmeans_init(level, residual)
            book = self.codebooks[level]
            with torch.no_grad():
                index = torch.cdist(residual.detach().to(book.dtype), book).argmin(1)
            chosen = book[index]
            loss = (
                loss
                + F.mse_loss(chosen, residual.detach())
                + self.beta * F.mse_loss(residual, chosen.detach())
            )
            picked.append(chosen)
            residuals.append(residual.detach())
            codes.append(index)
            # The next level sees the residual of the detached code: its own codebook term then
            # moves its own codes only, while the commitment terms still reach the encoder.
            residual = residual - chosen.detach()
        if train:
            self.initialised.fill_(True)
            for level, index in enumerate(codes):
                self.last_used[level, index] = self.step
                self.usage[level] += torch.bincount(index, minlength=self.codes)
                if self.dead_after is not None:
                    self._reseed_dead(level, residuals[level])
        quantized = torch.stack(picked).sum(0)
        straight = x + (quantized - x).detach()
        return straight, torch.stack(codes, 1), loss
