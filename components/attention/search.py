"""SIM-style hard search: which history items a target attends to at all."""

from __future__ import annotations

from torch import Tensor, nn

from rex.config.registry import register


@register("search/item_group")
class ItemGroupSearch(nn.Module):
    """SIM's hard search (Pi et al., CIKM 2020): keep the history items in the target's group.

    ``item_groups`` (num_items,) maps each item id to a group: its category, or its K-means
    cluster of content vectors (``rex data clusters``), which the builder passes as context.
    ``forward(target: (B,) ids, history: (B, L) ids, mask: (B, L) bool) -> (B, L) bool``, the
    mask narrowed to the items whose group is the target's; attention then runs over those only.
    """

    def __init__(self, item_groups: Tensor) -> None:
        super().__init__()
        if item_groups.dim() != 1:
            raise ValueError(f"item_groups must be (num_items,), got {tuple(item_groups.shape)}")
        self.register_buffer("item_groups", item_groups.long(), persistent=False)

    def forward(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        return mask & (self.item_groups[history] == self.item_groups[target][:, None])
