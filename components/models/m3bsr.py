"""M3BSR: Multi-Modal Multi-Behavior Sequential Recommendation with Conditional Diffusion-Based
Feature Denoising (Cui et al., SIGIR 2025, arXiv:2508.05352), for CTR."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import Factory, register


def _left_pad(x: Tensor, length: int) -> Tensor:
    """(B, L, ...) right-aligned sequence -> (B, length, ...), zeros added on the left."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], extra, *x.shape[2:]), x], dim=1)


@register("model/m3bsr")
class M3BSR(nn.Module):
    """Streams of (behaviour history x modality), conditionally denoised, then multi-expert interests.

    ``streams`` maps a stream name to ``KEY`` or ``KEY:MODALITY``: the batch's (B, L) id
    history ``KEY`` (``history``, ``history_view`` ...) embedded by item ID or by the named
    modality (``modality`` tables). Returns ``logit`` (B,), ``eps`` / ``eps_pred`` (the
    denoisers' eps-MSE pair) and, with ``contrast: [a, b]``, ``anchor`` / ``positive``: the
    target-attended interests of streams a and b (for InfoNCE).

    * Conditional diffusion denoising: each stream named in ``denoise`` (stream -> guide streams)
      is denoised by its own ``denoiser`` conditioned on the guides' sequences (behaviour
      denoising: view guided by cart and buy; modality denoising: text and image guided by ID).
    * Multi-expert interest extraction: ``experts`` (one per stream plus shared); each expert's
      positions are pooled by attention to the target (in its stream's modality; shared experts
      use the mean target); ``router`` mixes the experts with weights from the target.
    * Tower over the target's embedding per modality, the mixed interest and every expert's.
    """

    def __init__(
        self,
        fields: dict[str, int],
        streams: dict[str, str],
        embed: Factory[nn.Module],
        experts: Factory[nn.Module],
        router: Factory[nn.Module],
        tower: Factory[nn.Module],
        modality: Factory[nn.Module] | None = None,
        denoise: dict[str, list[str]] | None = None,
        denoiser: Factory[nn.Module] | None = None,
        contrast: list[str] | None = None,
    ) -> None:
        super().__init__()
        if "item" not in fields:
            raise ValueError("M3BSR needs the 'item' field")
        self.keys = {name: spec.split(":")[0] for name, spec in streams.items()}
        self.modality_of = {name: (spec.split(":") + ["id"])[1] for name, spec in streams.items()}
        modalities = sorted({m for m in self.modality_of.values() if m != "id"})
        if modalities and modality is None:
            raise ValueError(f"streams use modalities {modalities}: set `modality` (encoder/modality_table)")
        denoise = denoise or {}
        named = set(denoise) | {g for guides in denoise.values() for g in guides} | set(contrast or [])
        if named - set(streams):
            raise ValueError(f"denoise/contrast name unknown streams {sorted(named - set(streams))}")
        if contrast is not None and len(contrast) != 2:
            raise ValueError(f"contrast takes two stream names, got {contrast}")
        self.embed = embed(fields={"item": fields["item"]})
        self.register_buffer("item_ids", torch.arange(fields["item"]), persistent=False)
        dim = self.embed.dim
        self.tables = nn.ModuleDict(
            {m: modality(modality=m, dim=dim) for m in modalities}  # type: ignore[misc]
        )
        self.denoise = denoise if denoiser is not None else {}
        self.denoisers = nn.ModuleDict({name: denoiser(dim=dim) for name in self.denoise})  # type: ignore[misc]
        self.names = list(streams)
        self.experts = experts(dim=dim, streams=self.names)
        self.router = router(dim=dim, num_experts=self.experts.num_experts)
        self.contrast = contrast
        noise = {"eps", "eps_pred"} if self.denoise else set()
        pair = {"anchor", "positive"} if contrast is not None else set()
        self.outputs = frozenset({"logit", *noise, *pair})
        self.target_modalities = ["id", *modalities]
        width = len(self.target_modalities) * dim + dim + self.experts.num_experts * dim
        self.tower = tower(in_dim=width)
        self.head = nn.Linear(self.tower.out_dim, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # Each modality table is projected once for every item, then indexed (cheaper than
        # projecting every history position).
        tables = {m: self.tables[m](self.item_ids) for m in self.tables}
        tables["id"] = self.embed.lookup("item", self.item_ids)
        targets = {m: tables[m][batch["item"]] for m in self.target_modalities}
        seqs, masks = {}, {}
        for name in self.names:
            ids = batch[self.keys[name]]
            masks[name] = ids > 0
            seqs[name] = tables[self.modality_of[name]][ids] * masks[name].unsqueeze(-1).float()
        noises, predictions = [], []
        for name, guides in self.denoise.items():
            cond = torch.cat([seqs[g] for g in guides], dim=1)
            cond_mask = torch.cat([masks[g] for g in guides], dim=1)
            out, eps, eps_pred = self.denoisers[name](seqs[name], cond, cond_mask, masks[name])
            seqs[name] = out * masks[name].unsqueeze(-1).float()
            noises.append(eps)
            predictions.append(eps_pred)
        length = max(s.shape[1] for s in seqs.values())
        x = torch.stack([_left_pad(seqs[n], length) for n in self.names], dim=1)  # (B, K, L, d)
        mask = torch.stack([_left_pad(masks[n], length) for n in self.names], dim=1)  # (B, K, L)
        experts = self.experts(x, mask)  # (B, E, L, d)
        shared = experts.shape[1] - len(self.names)
        query = torch.stack([targets[self.modality_of[n]] for n in self.names], dim=1)
        query = torch.cat([query, query.mean(dim=1, keepdim=True).expand(-1, shared, -1)], dim=1)
        expert_mask = torch.cat([mask, mask.any(dim=1, keepdim=True).expand(-1, shared, -1)], dim=1)
        logits = (experts * query.unsqueeze(2)).sum(-1) * experts.shape[-1] ** -0.5  # (B, E, L)
        logits = logits.masked_fill(~expert_mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1) * expert_mask.to(logits.dtype)
        interests = torch.einsum("bel,beld->bed", weights, experts)  # (B, E, d)
        mixed, _ = self.router(query.mean(dim=1), interests)
        parts = [*targets.values(), mixed, interests.flatten(1)]
        outputs = {"logit": self.head(self.tower(torch.cat(parts, dim=1))).squeeze(-1)}
        if noises:
            outputs["eps"], outputs["eps_pred"] = torch.cat(noises), torch.cat(predictions)
        if self.contrast is not None:
            a, b = (self.names.index(n) for n in self.contrast)
            outputs["anchor"], outputs["positive"] = interests[:, a], interests[:, b]
        return outputs
