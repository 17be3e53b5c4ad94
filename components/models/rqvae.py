"""RQ-VAE item tokenizer (TIGER's semantic IDs, arXiv:2305.05065)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.encoders.mlp import MLP, Activation
from rex.components.quantizers.codes import codebook_usage, collision_rate, semantic_ids
from rex.config.registry import Factory, register


@register("model/rqvae")
class RQVAE(nn.Module):
    """MLP encoder → residual quantizer → MLP decoder over one modality of the items' content.

    Batch: ``item`` (B,) ids in 1 .. num_items - 1. Returns ``target`` (B, d), the item's row of
    ``item_features[content]``; ``reconstruction`` (B, d), decoded from the quantized latent;
    ``quantization_loss`` (scalar) from the quantizer; ``codes`` (B, L) long. The quantizer is
    built as ``quantizer(dim=dim)`` and must return ``(quantized, codes, loss)`` and expose
    ``levels`` and ``codes`` (codes per level). ``hidden`` are the encoder's widths, mirrored by
    the decoder. :meth:`item_codes` gives every item's semantic ID.
    """

    def __init__(
        self,
        item_features: dict[str, Tensor],
        content: str,
        quantizer: Factory[nn.Module],
        hidden: list[int] | None = None,
        dim: int = 32,
        dropout: float = 0.0,
        activation: Activation = "relu",
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if content not in item_features:
            available = ", ".join(sorted(item_features)) or "none (the dataset has no items view)"
            raise ValueError(f"unknown content {content!r}; the dataset's modalities: {available}")
        table = item_features[content].detach().float().clone()
        if table.dim() != 2 or len(table) < 2:
            raise ValueError(f"item_features[{content!r}] must be (num_items, d), got {tuple(table.shape)}")
        if dim <= 0 or chunk_size <= 0:
            raise ValueError(f"dim and chunk_size must be positive, got {dim} and {chunk_size}")
        hidden = [512, 256, 128] if hidden is None else list(hidden)  # TIGER's widths
        table[0] = 0.0  # padding carries no content
        # Not persistent: the content comes from the dataset, so checkpoints hold the model alone.
        self.register_buffer("table", table, persistent=False)
        self.table: Tensor
        width = table.shape[1]
        self.encoder = MLP(width, [*hidden, dim], activation, dropout, output_activation=False)
        self.quantizer = quantizer(dim=dim)
        self.decoder = MLP(dim, [*reversed(hidden), width], activation, dropout, output_activation=False)
        self.levels: int = self.quantizer.levels
        self.codebook_size: int = self.quantizer.codes
        self.chunk_size = chunk_size
        self.outputs = frozenset({"reconstruction", "target", "quantization_loss", "codes"})

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        target = self.table[batch["item"].long()]
        quantized, codes, loss = self.quantizer(self.encoder(target))
        return {
            "reconstruction": self.decoder(quantized),
            "target": target,
            "quantization_loss": loss,
            "codes": codes,
        }

    @torch.no_grad()
    def raw_codes(self) -> Tensor:
        """(num_items - 1, L) long codes of items 1 .. num_items - 1, in eval mode, in chunks."""
        was_training = self.training
        self.eval()
        try:
            items = torch.arange(1, len(self.table), device=self.table.device)
            parts = [
                self.quantizer(self.encoder(self.table[chunk]))[1] for chunk in items.split(self.chunk_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(parts)

    def item_codes(self) -> Tensor:
        """(num_items, L + 1) long semantic IDs: row 0 (padding) is -1; an item's row is its L
        codes and a last code, 0 for the first item (by id) of each code tuple and 1, 2, ... for
        the items that collide with it, so that every item's row is unique."""
        return semantic_ids(self.raw_codes())

    def code_stats(self) -> dict[str, Tensor | float]:
        """``usage`` (L,): the share of each level's codes that the items use; ``collision_rate``:
        the share of items whose L-code tuple another item holds (before the last code)."""
        codes = self.raw_codes()
        return {"usage": codebook_usage(codes, self.codebook_size), "collision_rate": collision_rate(codes)}
