"""MMQ: Multimodal Mixture-of-Quantization tokenizer (Xu et al., 2025, arXiv:2508.15281)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.encoders.mlp import MLP, Activation
from rex.components.quantizers.codes import semantic_ids
from rex.config.registry import Factory, register


@register("model/mmq")
class MMQ(nn.Module):
    """Shared-specific multimodal tokenizer: modality experts → router → residual quantizer →
    one decoder per modality; its codes are the items' semantic IDs.

    **Encoder.** Each modality's item vector (``item_features[m]`` for m in ``modalities``) is
    projected to ``width``; ``experts`` (an ``experts/bank`` built with ``streams=modalities``)
    gives one specific expert per modality and its shared experts over the modalities' mean;
    ``router`` (a ``gate/router``) mixes the K specific and S shared outputs by softmax weights
    from the same mean, and a Linear maps the mixture to the ``dim``-wide latent that
    ``quantizer(dim=dim)`` quantizes (``(quantized, codes, loss)``, with ``levels``, ``codes``
    and a differentiable ``soft(x, temperature)``, as ``quantizer/residual`` has). Each
    modality's decoder (``hidden`` widths from the latent up) reconstructs its vector from the
    quantized latent.

    **Batches.** An ``item`` batch (task items, stage 1) returns ``reconstruction_<m>`` and
    ``target_<m>`` per modality, their concatenations ``reconstruction`` and ``target`` (what
    ``eval/reconstruction`` reads), ``quantization_loss``, ``codes`` (B, levels), ``shared``
    (B, S, width) and ``specific`` (B, K, width), for ``loss/orthogonal``.

    A training sequence batch (task next_item: ``items`` (B, W) left-padded, ``targets`` (B, W))
    is behaviour-aware fine-tuning (stage 2): the batch's distinct items get the outputs above,
    and each position with a next item gets a user vector, the mean of the soft-quantized
    vectors (``quantizer.soft`` at ``temperature``) of its row's items so far. ``logits`` (P, U)
    are its cosine with each of the batch's U distinct items' soft-quantized vectors over
    ``behaviour_temperature``, and ``labels`` (P,) index the next item among them
    (``loss/softmax_ce``); the row's other items are masked, as the user's own items are in
    evaluation, so a user vector is never asked to be further from the item it averages than
    from the next. Soft indexing lets that loss move which codes an item takes.

    An evaluation sequence batch (``history`` (B, L)) returns ``scores`` (B, num_items): the
    cosine between the mean of the history's hard-quantized vectors and every item's, so
    ``eval/ranking`` measures how well the exported codes follow behaviour.

    :meth:`item_codes` gives every item's semantic ID, with a disambiguation column, as
    ``model/rqvae`` does.
    """

    def __init__(
        self,
        item_features: dict[str, Tensor],
        quantizer: Factory[nn.Module],
        experts: Factory[nn.Module],
        router: Factory[nn.Module],
        modalities: list[str] | None = None,
        width: int = 256,
        dim: int = 32,
        hidden: list[int] | None = None,
        temperature: float = 0.01,
        behaviour_temperature: float = 0.1,
        dropout: float = 0.0,
        activation: Activation = "relu",
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        self.modalities = list(modalities or ["text", "image"])
        missing = [m for m in self.modalities if m not in item_features]
        if missing:
            available = ", ".join(sorted(item_features)) or "none (the dataset has no items view)"
            raise ValueError(f"unknown modalities {missing}; the dataset's modalities: {available}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct, got {self.modalities}")
        if min(width, dim, chunk_size) <= 0:
            raise ValueError(f"width, dim and chunk_size must be positive, got {width}, {dim}, {chunk_size}")
        if temperature <= 0 or behaviour_temperature <= 0:
            raise ValueError(
                f"temperature and behaviour_temperature must be positive, got {temperature}, {behaviour_temperature}"
            )
        tables = [item_features[m].detach().float() for m in self.modalities]
        if any(t.dim() != 2 or len(t) != len(tables[0]) or len(t) < 2 for t in tables):
            raise ValueError(
                f"item_features of {self.modalities} must be (num_items, d) tables of one length"
            )
        table = torch.cat(tables, dim=1)
        table[0] = 0.0  # padding carries no content
        # Not persistent: the content comes from the dataset, so checkpoints hold the model alone.
        self.register_buffer("table", table, persistent=False)
        self.table: Tensor
        self.widths = [t.shape[1] for t in tables]
        hidden = [128, 256] if hidden is None else list(hidden)
        self.inputs = nn.ModuleDict(
            {
                m: MLP(d, [width], activation, dropout)
                for m, d in zip(self.modalities, self.widths, strict=True)
            }
        )
        self.experts = experts(dim=width, streams=self.modalities)
        self.router = router(dim=width, num_experts=self.experts.num_experts)
        self.to_latent = nn.Linear(width, dim)
        self.quantizer = quantizer(dim=dim)
        self.decoders = nn.ModuleDict(
            {
                m: MLP(dim, [*hidden, d], activation, dropout, output_activation=False)
                for m, d in zip(self.modalities, self.widths, strict=True)
            }
        )
        self.levels: int = self.quantizer.levels
        self.codebook_size: int = self.quantizer.codes
        self.temperature = temperature
        self.behaviour_temperature = behaviour_temperature
        self.chunk_size = chunk_size
        per_modality = {f"{kind}_{m}" for m in self.modalities for kind in ("reconstruction", "target")}
        self.outputs = frozenset(
            {
                "reconstruction",
                "target",
                "quantization_loss",
                "codes",
                "shared",
                "specific",
                "logits",
                "labels",
                "scores",
                *per_modality,
            }
        )

    # ------------------------------------------------------------------ tokenizer
    def encode(self, items: Tensor) -> dict[str, Tensor]:
        """(N,) item ids → ``latent`` (N, dim) before quantization, ``shared`` (N, S, width) and
        ``specific`` (N, K, width) expert outputs."""
        vectors = self.table[items.long()].split(self.widths, dim=-1)
        streams = torch.stack([self.inputs[m](v) for m, v in zip(self.modalities, vectors, strict=True)], 1)
        experts = self.experts(streams)  # (N, K + S, width): the K specific experts first
        mixed, _ = self.router(streams.mean(dim=1), experts)
        k = len(self.modalities)
        return {"latent": self.to_latent(mixed), "shared": experts[:, k:], "specific": experts[:, :k]}

    def tokenize(self, items: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The item-batch outputs for (N,) item ids, and their pre-quantization latent (N, dim)."""
        encoded = self.encode(items)
        quantized, codes, loss = self.quantizer(encoded["latent"])
        target = self.table[items.long()]
        out = {"target": target, "quantization_loss": loss, "codes": codes}
        out |= {"shared": encoded["shared"], "specific": encoded["specific"]}
        parts = []
        for m, part in zip(self.modalities, target.split(self.widths, dim=-1), strict=True):
            parts.append(self.decoders[m](quantized))
            out[f"reconstruction_{m}"], out[f"target_{m}"] = parts[-1], part
        out["reconstruction"] = torch.cat(parts, dim=-1)
        return out, encoded["latent"]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "item" in batch:
            return self.tokenize(batch["item"])[0]
        if "targets" in batch:
            return self._behaviour(batch["items"], batch["targets"])
        return {"scores": self._scores(batch["history"])}

    # ------------------------------------------------------------------ behaviour-aware fine-tuning
    def _behaviour(self, items: Tensor, targets: Tensor) -> dict[str, Tensor]:
        both = torch.cat([items, targets], dim=1).long()
        ids = torch.unique(both[both > 0])  # sorted: searchsorted maps an item to its row
        out, latent = self.tokenize(ids)
        soft = self.quantizer.soft(latent, self.temperature)  # (U, dim)
        where = torch.searchsorted(ids, items.long().clamp(min=1))
        real = (items > 0).unsqueeze(-1)
        vectors = torch.where(real, soft[where], 0.0)  # (B, W, dim), zero at padding
        counts = real.cumsum(dim=1).clamp(min=1)
        users = vectors.cumsum(dim=1) / counts  # each position: the mean of its row's items so far
        valid = targets > 0
        labels = torch.searchsorted(ids, targets[valid].long())
        logits = F.normalize(users[valid], dim=-1) @ F.normalize(soft, dim=-1).T / self.behaviour_temperature
        # The row's own items other than the label are not negatives (see the class docstring).
        rows = torch.zeros(len(items), len(ids), dtype=torch.bool, device=ids.device)
        rows.scatter_(1, torch.searchsorted(ids, both.clamp(min=1)), both > 0)
        own = rows[valid.nonzero()[:, 0]]
        own[torch.arange(len(labels), device=own.device), labels] = False
        out["logits"] = logits.masked_fill(own, torch.finfo(logits.dtype).min)
        out["labels"] = labels
        return out

    @torch.no_grad()
    def quantized_items(self) -> Tensor:
        """(num_items, dim) hard-quantized latent of every item (row 0, padding, zero), in chunks."""
        items = torch.arange(1, len(self.table), device=self.table.device)
        parts = [self.quantizer.lookup(self.raw_codes(chunk)) for chunk in items.split(self.chunk_size)]
        return torch.cat([parts[0].new_zeros(1, parts[0].shape[1]), *parts])

    def _scores(self, history: Tensor) -> Tensor:
        table = self.quantized_items()
        real = (history > 0).unsqueeze(-1)
        users = (table[history.long()] * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return F.normalize(users, dim=-1) @ F.normalize(table, dim=-1).T

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def raw_codes(self, items: Tensor | None = None) -> Tensor:
        """(N, levels) long codes, in eval mode, of ``items`` (default 1 .. num_items - 1)."""
        was_training = self.training
        self.eval()
        try:
            if items is None:
                items = torch.arange(1, len(self.table), device=self.table.device)
            parts = [
                self.quantizer(self.encode(chunk)["latent"])[1] for chunk in items.split(self.chunk_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(parts)

    def item_codes(self) -> Tensor:
        """(num_items, levels + 1) long semantic IDs: row 0 (padding) is -1, then each item's
        codes and the column that separates items sharing them (see ``semantic_ids``)."""
        return semantic_ids(self.raw_codes())
