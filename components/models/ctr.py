"""Click-through-rate models assembled from an embedding, interactions and an MLP tower."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rex.components.embeddings.field import FieldEmbedding
from rex.config.registry import Factory, register


class CTRInputs(nn.Module):
    """What a CTR tower reads: field embeddings, [target attention over the history].

    The shared front of ``model/ctr`` and ``model/multi_scenario`` (see model/ctr for the
    arguments). ``inputs(batch) -> (x (B, width), embedded (B, F, dim), extra)``: ``x`` is the
    flattened field embeddings, the target's modality vectors and codes, and the pooled interest;
    ``extra`` holds the interest module's loss terms. ``width`` and ``outputs`` are set here.
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        interest: Factory[nn.Module] | None = None,
        search: Factory[nn.Module] | None = None,
        history_key: str = "history",
        use_fields: list[str] | None = None,
        modalities: list[str] | None = None,
        modality: Factory[nn.Module] | None = None,
        codes: Factory[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.history_key = history_key
        if use_fields is not None:
            unknown = sorted(set(use_fields) - set(fields))
            if unknown:
                raise ValueError(f"use_fields {unknown} are not in the dataset's fields {sorted(fields)}")
            fields = {name: fields[name] for name in use_fields}
        if (interest is not None or modalities or codes is not None) and "item" not in fields:
            raise ValueError("interest (target attention), modalities and codes need the 'item' field")
        if bool(modalities) != (modality is not None):
            raise ValueError("modality (an encoder/modality_table node) and modalities go together")
        self.used_fields = fields
        self.embed = embed(fields=fields)
        dim = self.embed.dim
        self.item_slot = list(fields).index("item") if "item" in fields else -1
        self.modality_tables = nn.ModuleList(
            modality(modality=name) for name in (modalities or []) if modality is not None
        )
        # An item's semantic IDs (an earlier stage's export) join its modality vectors.
        self.codes = codes() if codes is not None else None
        extra = sum(table.dim for table in self.modality_tables)
        extra += self.codes.out_dim if self.codes is not None else 0
        self.interest = interest(dim=dim + extra) if interest is not None else None
        if search is not None and interest is None:
            raise ValueError("search narrows what the interest module attends to: set interest too")
        self.search = search() if search is not None else None
        self.outputs = frozenset({"logit", *getattr(self.interest, "extra_outputs", ())})
        self.width = len(fields) * dim + extra + (dim + extra if self.interest is not None else 0)

    def _with_modalities(self, ids: Tensor, embedded: Tensor) -> Tensor:
        """Item id embeddings (..., dim) with each modality's projected vectors, then the
        embedded codes, appended."""
        tables = [*self.modality_tables, *([self.codes] if self.codes is not None else [])]
        if not tables:
            return embedded
        return torch.cat([embedded, *(table(ids) for table in tables)], dim=-1)

    def inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        embedded = self.embed(batch)
        target = embedded[:, self.item_slot] if self.item_slot >= 0 else embedded[:, 0]
        if self.modality_tables or self.codes is not None:
            target = self._with_modalities(batch["item"], target)
        parts = [embedded.flatten(1), target[:, embedded.shape[-1] :]]
        extra: dict[str, Tensor] = {}
        if self.interest is not None:
            history = batch[self.history_key]
            behaviours = self._with_modalities(history, self.embed.lookup("item", history))
            mask = history > 0
            if self.search is not None:
                mask = self.search(batch["item"], history, mask)
            interest = self.interest(target, behaviours, mask)
            if isinstance(interest, tuple):  # the pooled vector and the module's loss terms
                interest, extra = interest
            parts.append(interest)
        return torch.cat(parts, dim=1), embedded, extra


@register("model/ctr")
class CTRModel(CTRInputs):
    """CTR tower: field embeddings → [target attention over the history] → MLP → click logit.

    With ``interaction: interaction/fm`` and ``linear: true`` it is DeepFM; with
    ``interaction/cross`` DCN-V2 (parallel); with ``interaction/self_attention`` AutoInt+; with
    ``interaction/dual_attention`` Dual Enhanced Attention; with
    ``interest: attention/target`` it is DIN, with ``attention/low_rank`` LREA. An interaction
    maps the (B, F, d) field embeddings to a (B,) term added to the logit. Batch: one (B,) id
    tensor per categorical field, plus the ``history_key`` column (B, L) item ids (left-padded
    with 0) when ``interest`` is set: ``history`` by default, or a joined user column such as
    ``history_view``. ``search`` (``search/item_group``) narrows the history each target attends
    to (SIM's hard search). Returns ``logit`` (B,), and any loss terms the interest module
    returns beside its pooled vector (its ``extra_outputs``).

    With ``modality`` (an ``encoder/modality_table`` node, built once per name in
    ``modalities``), every item (the target and each history item) is its id embedding
    concatenated with its projected modality vectors, so target attention compares items by
    content as well as by id (din_mm). With ``codes`` (an ``embedding/item_codes`` node over
    an earlier stage's ``item_codes`` export), every item's semantic IDs are appended the same
    way, as sparse item features (MMQ's discriminative use, recipes/mmq_din.yaml).
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        tower: Factory[nn.Module],
        interaction: Factory[nn.Module] | None = None,
        interest: Factory[nn.Module] | None = None,
        linear: bool = False,
        use_fields: list[str] | None = None,
        modality: Factory[nn.Module] | None = None,
        modalities: list[str] | None = None,
        history_key: str = "history",
        search: Factory[nn.Module] | None = None,
        codes: Factory[nn.Module] | None = None,
    ) -> None:
        super().__init__(
            fields, embed, interest, search, history_key, use_fields, modalities, modality, codes
        )
        fields = self.used_fields
        dim = self.embed.dim
        self.tower = tower(in_dim=self.width)
        self.head = nn.Linear(self.tower.out_dim, 1)
        self.interaction = None
        if interaction is not None:
            # The field layout, for the interactions with weights over it (cross, self-attention);
            # a parameter-free one (FM) takes neither.
            layout = {"num_fields": len(fields), "dim": dim}
            self.interaction = interaction(**{k: v for k, v in layout.items() if interaction.accepts(k)})
        self.first_order = FieldEmbedding(fields, dim=1) if linear else None
        self.bias = nn.Parameter(torch.zeros(1)) if linear else None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, embedded, extra = self.inputs(batch)
        logit = self.head(self.tower(x)).squeeze(-1)
        if self.interaction is not None:
            # An interaction that memorises feature pairs (dual_attention) reads their ids too.
            ids = (self.embed.global_ids(batch),) if getattr(self.interaction, "reads_ids", False) else ()
            logit = logit + self.interaction(embedded, *ids)
        if self.first_order is not None and self.bias is not None:
            logit = logit + self.first_order(batch).sum(dim=(1, 2)) + self.bias
        return {"logit": logit, **extra}
