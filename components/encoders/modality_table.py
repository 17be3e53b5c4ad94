"""Pretrained item vectors of one modality (text, image ...) as a projected lookup table."""

from __future__ import annotations

from torch import Tensor, nn

from rex.config.registry import register


@register("encoder/modality_table")
class ModalityTable(nn.Module):
    """Item ids → the named modality's pretrained vectors → Linear projection to ``dim``.

    ``item_features`` maps a modality name to a float32 (num_items, d) table indexed by item id
    whose row 0 is the padding row (the datamodule context supplies it); ``modality`` picks one.
    ``forward(item_ids: LongTensor (...)) -> (..., dim)``. The table is a frozen buffer, or a
    trainable parameter with ``finetune: true``. Padding id 0 feeds zeros into the projection,
    so its output is the projection's bias.
    """

    def __init__(
        self, item_features: dict[str, Tensor], modality: str, dim: int, finetune: bool = False
    ) -> None:
        super().__init__()
        if modality not in item_features:
            available = ", ".join(sorted(item_features)) or "none (the dataset has no items view)"
            raise ValueError(f"unknown modality {modality!r}; the dataset's modalities: {available}")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        table = item_features[modality].detach().float().clone()
        if table.dim() != 2:
            raise ValueError(f"item_features[{modality!r}] must be (num_items, d), got {tuple(table.shape)}")
        # Row 0 is padding: zero it whatever the caller passed, so padding never carries content.
        table[0] = 0.0
        self.modality = modality
        self.dim = dim
        self.in_dim = table.shape[1]
        self.table: Tensor
        if finetune:
            self.table = nn.Parameter(table)
        else:
            # A non-persistent buffer: the vectors come from the dataset, so checkpoints stay small
            # and a frozen table cannot drift from the data it was built from.
            self.register_buffer("table", table, persistent=False)
        self.proj = nn.Linear(self.in_dim, dim)

    def forward(self, item_ids: Tensor) -> Tensor:
        vectors = self.table[item_ids]
        if isinstance(self.table, nn.Parameter):
            # Keep the fine-tuned padding row at zero: no gradient reaches it.
            vectors = vectors * (item_ids > 0).unsqueeze(-1).to(vectors.dtype)
        return self.proj(vectors)
