"""Diff-MSIN: Diffusion-based Multi-modal Synergy Interest Network (Cui et al., 2025, arXiv:2508.21460)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.config.registry import Factory, register


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions axis of (B, ..., L, d) where (B, ..., L) ``mask`` is True; 0 if none."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


@register("model/diff_msin")
class DiffMSIN(nn.Module):
    """Diff-MSIN for CTR over an item history with ID, text and image streams.

    Batch: ``item`` (B,) ids and ``history`` (B, L) left-padded ids. Returns ``logit`` (B,),
    ``experts`` (B, E, dim) (each expert's mean over the history, for Knowledge Decoupling) and
    ``synergy_eps`` / ``synergy_eps_pred`` (for the SRC's eps-MSE).

    * MFE: streams = the history embedded by ID (``embed``) and by each of ``modalities``
      (``modality`` tables of pretrained vectors projected to dim); ``experts`` gives one
      specific expert per stream and shared experts over their mean.
    * SRC (``synergy``, optional): the specific experts denoised jointly, each conditioned on the
      others; its fused output plus the streams' mean is one more expert.
    * FDAF (``fusion``): pairwise interaction, target attention and a score vector per expert;
      each specific expert's target is the target item in its stream's modality, the shared
      and synergy experts' target is the mean of those.
    * The tower sees the target's K embeddings, DIN interest over the ID history (``interest``,
      optional) and the FDAF scores.
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        modality: Factory[nn.Module],
        experts: Factory[nn.Module],
        fusion: Factory[nn.Module],
        tower: Factory[nn.Module],
        modalities: list[str] | None = None,
        synergy: Factory[nn.Module] | None = None,
        interest: Factory[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if "item" not in fields:
            raise ValueError("Diff-MSIN needs the 'item' field")
        modalities = ["text", "image"] if modalities is None else modalities
        self.embed = embed(fields={"item": fields["item"]})
        self.register_buffer("item_ids", torch.arange(fields["item"]), persistent=False)
        dim = self.embed.dim
        self.tables = nn.ModuleDict({name: modality(modality=name, dim=dim) for name in modalities})
        streams = ["id", *modalities]
        self.num_streams = len(streams)
        self.experts = experts(dim=dim, streams=streams)
        self.synergy = synergy(dim=dim, num_streams=self.num_streams) if synergy is not None else None
        noise = {"synergy_eps", "synergy_eps_pred"} if self.synergy is not None else set()
        self.outputs = frozenset({"logit", "experts", *noise})
        self.fusion = fusion(dim=dim)
        self.interest = interest(dim=dim) if interest is not None else None
        num_experts = self.experts.num_experts + (1 if self.synergy is not None else 0)
        width = self.num_streams * dim + (dim if self.interest is not None else 0)
        self.tower = tower(in_dim=width + num_experts * self.fusion.score_dim)
        self.head = nn.Linear(self.tower.out_dim, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        history = batch["history"]
        mask = history > 0
        # Each modality table is projected once for every item and then indexed: cheaper than
        # projecting each of the B x L history positions.
        tables = [self.embed.lookup("item", self.item_ids), *(t(self.item_ids) for t in self.tables.values())]
        # Padding rows are zeroed: a modality table maps id 0 to its projection's bias.
        streams = torch.stack([t[history] for t in tables], dim=1) * mask[:, None, :, None].to(torch.float32)
        targets = torch.stack([t[batch["item"]] for t in tables], dim=1)  # (B, K, d)
        experts = self.experts(streams, mask)  # (B, K + S, L, d)
        k, shared = self.num_streams, experts.shape[1] - self.num_streams
        mean_target = targets.mean(dim=1, keepdim=True)
        expert_targets = [targets, mean_target.expand(-1, shared, -1)]
        noise = {}
        if self.synergy is not None:
            h_syn, noise["synergy_eps"], noise["synergy_eps_pred"] = self.synergy(experts[:, :k], mask)
            experts = torch.cat([experts, (h_syn + streams.mean(dim=1)).unsqueeze(1)], dim=1)
            expert_targets.append(mean_target)
        scores = self.fusion(experts, torch.cat(expert_targets, dim=1), mask)  # (B, E, s)
        parts = [targets.flatten(1)]
        if self.interest is not None:
            parts.append(self.interest(targets[:, 0], streams[:, 0], mask))
        parts.append(scores.flatten(1))
        logit = self.head(self.tower(torch.cat(parts, dim=1))).squeeze(-1)
        return {
            "logit": logit,
            "experts": masked_mean(experts, mask[:, None, :]),
            **noise,
        }
