"""GRU4Rec's recurrent sequence encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rex.config.registry import register


@register("encoder/gru")
class GRUEncoder(nn.Module):
    """GRU4Rec's encoder (Hidasi et al., ICLR 2016): a GRU over the item sequence.

    Input ``(B, L, dim)`` left-padded, with ``padding_mask`` ``(B, L)`` True at padding. Output
    ``(B, L, dim)``: each position's state reads its own item and the earlier ones only; padding
    positions are 0. With ``last_only`` the output is ``(B, 1, dim)``. Each row is run from its
    first real item (packed), so a state does not depend on how much padding its batch has.
    ``hidden`` is the GRU's width (default ``dim``); a linear layer maps it back to ``dim``.
    ``dim`` is supplied by the parent.
    """

    def __init__(
        self, dim: int, num_layers: int = 1, hidden: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        width = hidden or dim
        self.gru = nn.GRU(
            dim, width, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.proj: nn.Module = nn.Linear(width, dim) if width != dim else nn.Identity()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        if padding_mask is None:
            states, _ = self.gru(x)
        else:
            b, length, _ = x.shape
            lengths = (~padding_mask).sum(dim=1)
            pads = length - lengths
            steps = torch.arange(length, device=x.device)
            # Left-padded rows moved to the left edge for packing, and the states moved back.
            right = x.gather(1, (steps + pads[:, None]).clamp(max=length - 1)[..., None].expand_as(x))
            packed = pack_padded_sequence(
                right, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)
            back = (steps - pads[:, None]).clamp(min=0)[..., None].expand(-1, -1, states.shape[-1])
            states = states.gather(1, back)
        out = self.proj(states)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask[..., None], 0.0)
        return out[:, -1:] if last_only else out
