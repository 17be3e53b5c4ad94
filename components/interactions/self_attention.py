"""AutoInt's interacting layers (Song et al., CIKM 2019, arXiv:1810.11921)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from rex.config.registry import register


@register("interaction/self_attention")
class InteractingLayers(nn.Module):
    """Multi-head self-attention across fields, stacked, as a logit (AutoInt).

    Input ``(B, F, d)`` field embeddings. Each of the ``layers`` interacting layers attends from
    every field to every field with ``heads`` heads of width ``head_dim``, concatenates the
    heads, adds a linear residual projection of its input and applies ReLU: ``(B, F, heads *
    head_dim)``. Output ``(B,)``: a linear head over the flattened last layer. With
    ``model/ctr``'s MLP tower beside it this is AutoInt+; ``num_fields`` and ``dim`` are supplied
    by the parent.
    """

    def __init__(
        self, num_fields: int, dim: int, layers: int = 3, heads: int = 2, head_dim: int = 32
    ) -> None:
        super().__init__()
        if layers < 1 or heads < 1 or head_dim < 1:
            raise ValueError(
                f"layers, heads and head_dim must be positive, got {layers}, {heads}, {head_dim}"
            )
        self.heads, width = heads, heads * head_dim
        widths = [dim] + [width] * layers
        self.qkv = nn.ModuleList(nn.Linear(w, 3 * width, bias=False) for w in widths[:-1])
        self.residual = nn.ModuleList(nn.Linear(w, width, bias=False) for w in widths[:-1])
        self.head = nn.Linear(num_fields * width, 1)

    def forward(self, emb: Tensor) -> Tensor:
        h = emb
        for qkv, residual in zip(self.qkv, self.residual, strict=True):
            b, f, _ = h.shape
            q, k, v = qkv(h).view(b, f, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, F, h)
            # Unscaled dot products, as the paper writes the attention weights.
            attended = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(b, f, -1)
            h = F.relu(attended + residual(h))
        return self.head(h.flatten(1)).squeeze(-1)
