"""DMAE: Distribution-Guided Multimodal-Interest Auto-Encoder for CTR (arXiv:2508.14485)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.models.shared import item_fields
from rex.config.registry import Factory, register


@register("model/dmae")
class DMAE(nn.Module):
    """DIN over item ids plus DMAE's multimodal interest branch; returns ``logit`` (B,).

    Batch: ``item`` (B,) and ``history`` (B, L) item ids (left-padded with 0), plus the other
    ``use_fields``. For each name in ``modalities`` the pretrained vectors of ``item_features``
    (frozen) give the target-history cosine similarity (B, L), which ``sim_bucket`` (one per
    modality, built from the factory) encodes as (B, L, dim) interest vectors (MIEU). The fusion
    unit (MIFU) weighs the modalities per behaviour with a softmax gate over the behaviour's id
    embedding and its modality vectors, and ``interest`` pools the fused behaviours against the
    target (B, dim). The decoder maps each fused behaviour back to one score per modality
    (``recon_logits`` (B, L, M), with ``recon_target`` the real similarities and ``recon_mask``)
    for ``loss/interest_reconstruction``. With ``decoder: false`` there is no decoder and no
    reconstruction output (the auto-encoder constraint alone is removed); with
    ``sim_bucket: null`` the whole multimodal branch is off, which leaves DIN.
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        item_features: dict[str, Tensor],
        interest: Factory[nn.Module],
        tower: Factory[nn.Module],
        modalities: list[str],
        sim_bucket: Factory[nn.Module] | None = None,
        use_fields: list[str] | None = None,
        decoder: bool = True,
    ) -> None:
        super().__init__()
        used = item_fields(fields, use_fields)
        missing = sorted(set(modalities) - set(item_features))
        if missing or not modalities:
            raise ValueError(
                f"modalities {missing or modalities} not available; the dataset's: {', '.join(sorted(item_features)) or 'none'}"
            )
        self.embed = embed(fields=used)
        dim = self.embed.dim
        self.item_slot = list(used).index("item")
        self.interest = interest(dim=dim)
        self.modalities = list(modalities)
        self.units = nn.ModuleList()
        if sim_bucket is not None:
            for name in self.modalities:
                # Unit-norm rows, so a matrix product gives the cosine similarity.
                vectors = nn.functional.normalize(item_features[name].detach().float(), dim=-1)
                self.register_buffer(f"vectors_{name}", vectors, persistent=False)
                self.units.append(sim_bucket(dim=dim))
            m = len(self.modalities)
            self.gate = nn.Linear((m + 1) * dim, m)
            self.fused_interest = interest(dim=dim)
        self.decoder = nn.Linear(dim, len(self.modalities)) if self.units and decoder else None
        width = (len(used) + 1 + (1 if self.units else 0)) * dim
        self.tower = tower(in_dim=width)
        decoded = {"recon_logits", "recon_target", "recon_mask"} if self.decoder is not None else set()
        self.outputs = frozenset({"logit", *decoded})
        self.head = nn.Linear(self.tower.out_dim, 1)

    def _similarity(self, name: str, item: Tensor, history: Tensor) -> Tensor:
        """(cos + 1) / 2 between each target and its history items in one modality: (B, L)."""
        vectors: Tensor = getattr(self, f"vectors_{name}")
        scores = vectors[item] @ vectors.T  # (B, num_items): cheaper than gathering (B, L, D)
        return (scores.gather(1, history) + 1) / 2

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        embedded = self.embed(batch)
        target = embedded[:, self.item_slot]
        history = batch["history"]
        mask = history > 0
        behaviours = self.embed.lookup("item", history)  # (B, L, dim)
        parts = [embedded.flatten(1), self.interest(target, behaviours, mask)]
        outputs: dict[str, Tensor] = {}
        if self.units:
            similarity = torch.stack(
                [self._similarity(n, batch["item"], history) for n in self.modalities], -1
            )
            encoded = torch.stack(
                [unit(similarity[..., i], mask) for i, unit in enumerate(self.units)], dim=2
            )  # (B, L, M, dim)
            gate = torch.softmax(self.gate(torch.cat([behaviours, encoded.flatten(2)], -1)), dim=-1)
            fused = torch.einsum("blm,blmd->bld", gate, encoded)
            parts.append(self.fused_interest(target, fused, mask))
            if self.decoder is not None:
                outputs = {
                    "recon_logits": self.decoder(fused),
                    "recon_target": similarity,
                    "recon_mask": mask,
                }
        logit = self.head(self.tower(torch.cat(parts, dim=1))).squeeze(-1)
        return {"logit": logit, **outputs}
