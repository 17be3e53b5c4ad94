"""Multi-objective two-tower retrieval: one user vector per objective, one item vector per item."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from rex.config.registry import Factory, register


class _Towers(nn.Module):
    """One user tower and one item tower sharing one item-id embedding table.

    User: each behaviour list's embeddings mean-pooled, concatenated, then ``user`` (a ``heads/...``
    node) gives one ``dim`` vector per objective. Item: the item's embedding, then ``item`` (an
    MLP ending at ``dim``), or the embedding itself without one.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        lists: int,
        objectives: list[str],
        user: Factory[nn.Module],
        item: Factory[nn.Module] | None,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_items, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.user = user(in_dim=lists * dim, out_dim=dim, objectives=objectives)
        self.item = item(in_dim=dim) if item is not None else None
        if self.item is not None and self.item.out_dim != dim:
            raise ValueError(f"item must end at dim={dim} (its last hidden width), got {self.item.out_dim}")

    def user_vectors(self, lists: list[Tensor]) -> Tensor:
        return self.user(self.pool(lists))  # (B, K, dim)

    def pool(self, lists: list[Tensor]) -> Tensor:
        """(B, lists * dim): the lists' mean embeddings side by side, the user heads' input."""
        # One fused gather-and-mean per list (the padding id 0 is left out of each mean, an empty
        # list pools to zeros): no (B, L, dim) tensor is materialised, which on CPU was a third
        # of a training step.
        weight = self.embedding.weight
        pooled = [F.embedding_bag(ids, weight, mode="mean", padding_idx=0) for ids in lists]
        return torch.cat(pooled, dim=-1)

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """The vectors of ``items`` (any shape), or (num_items, dim) of every item."""
        table = self.embedding.weight if items is None else self.embedding(items)
        return self.item(table) if self.item is not None else table


@register("model/two_tower")
class TwoTower(nn.Module):
    """Multi-objective two-tower retrieval: a user tower over the user's behaviour lists, an item
    tower over item ids, and one user vector per objective; objective k scores item i as
    ``q_k(u) @ v(i)`` (YouTube DNN's retrieval, Covington et al., RecSys 2016, with one query per
    objective).

    The objectives and the lists come from the data's roles (``target:<name>``, ``history:<name>``;
    taobao_mb: view, cart, buy). ``user`` is a ``heads/...`` node over the concatenated mean-pooled
    list embeddings: ``heads/shared_bottom`` or ``heads/mmoe``. ``separate: true`` builds one whole
    two-tower model per objective instead (K times the parameters): its item vector is the K
    towers' vectors side by side, and objective k's query is zero outside tower k's block.

    Training batch (``objective`` (B,) 1..K, ``item`` (B,), the lists): returns ``logits`` and
    ``labels`` for ``loss/softmax_ce``, each row scored by its own objective's query. By default
    ``logits`` (B, num_items) are the scores of every item (padding masked) and ``labels`` the
    ``item``s: a full softmax. With ``negatives: R`` they are (B, 1 + R): the row's item, then R
    items drawn uniformly once per batch and shared by its rows (one equal to the row's item is
    masked), with ``labels`` 0: a sampled softmax, whose uniform proposal needs no correction.
    Otherwise returns ``scores`` (B, K, num_items).

    ``mask`` (a ``mask/csmf`` node; not with ``separate``) splits the user heads' parameter
    elements between the objectives of a cascade: a stage trains only its objective's elements,
    and objective k's query is the heads' output with every element owned by a later objective
    zeroed (the heads run once per objective whose weights differ), so training a later objective
    never changes an earlier one's queries. The item side (embeddings, item tower) stays the first
    objective's, read by all through one table of item vectors.

    The retrieval protocol (``rex.eval.retrieval``; a vector index over ``item_vectors()``):
    ``item_vectors() -> (num_items, D)``, ``objective_vectors(batch) -> (B, K, D)`` and
    ``user_vectors(batch, fusion) -> (B, D)``, the query of the fused score ``sum_k w_k log p_k``.
    """

    outputs = ("logits", "labels", "scores")

    def __init__(
        self,
        num_items: int,
        roles: dict[str, str],
        user: Factory[nn.Module],
        item: Factory[nn.Module] | None = None,
        dim: int = 64,
        separate: bool = False,
        negatives: int | None = None,
        mask: Factory[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if negatives is not None and not 0 < negatives < num_items:
            raise ValueError(f"negatives must be in 1..{num_items - 1} (the items), got {negatives}")
        self.negatives = negatives
        self.objectives = [role.split(":", 1)[1] for role in roles if role.startswith("target:")]
        if not self.objectives:
            raise ValueError(
                "model/two_tower needs a view with target:<objective> fields (task multi_objective)"
            )
        missing = [name for name in self.objectives if f"history:{name}" not in roles]
        if missing:
            raise ValueError(f"the view has no history:<name> list for {', '.join(missing)}")
        self.lists = [roles[f"history:{name}"] for name in self.objectives]
        self.num_items, self.dim = num_items, dim
        groups = [[name] for name in self.objectives] if separate else [self.objectives]
        self.towers = nn.ModuleList(
            _Towers(num_items, dim, len(self.lists), group, user, item) for group in groups
        )
        if mask is not None and separate:
            raise ValueError("mask (CSMF) splits one shared user tower: it cannot go with separate: true")
        self.mask = mask(objectives=self.objectives) if mask is not None else None
        if self.mask is not None:
            self.mask.attach(self, split="towers.0.user")  # type: ignore[operator]

    @property
    def tower_list(self) -> list[_Towers]:
        """The towers, typed (to a type checker a ModuleList holds plain Modules)."""
        return [cast(_Towers, tower) for tower in self.towers]

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """(num_items, D) (row 0 is padding), or the (..., D) vectors of ``items``; D = dim, or
        K * dim with separate towers."""
        return torch.cat([tower.item_vectors(items) for tower in self.tower_list], dim=-1)

    def objective_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, K, D): objective k's query of each row."""
        lists = [batch[name] for name in self.lists]
        if self.mask is not None:
            pooled, plain = self.tower_list[0].pool(lists), None
            queries = []
            for k in range(len(self.objectives)):
                weights = self.mask.visible(k)  # type: ignore[operator]
                if not weights and plain is None:
                    plain = self.tower_list[0].user(pooled)  # one run for every objective reading all
                queries.append(self._masked_queries(pooled, k, weights, plain))
            return torch.stack(queries, dim=1)
        parts = [tower.user_vectors(lists) for tower in self.tower_list]
        if len(parts) == 1:
            return parts[0]
        # Separate towers: objective k's query fills tower k's block and is zero elsewhere.
        out = parts[0].new_zeros(parts[0].shape[0], len(parts), len(parts) * self.dim)
        for k, part in enumerate(parts):
            out[:, k, k * self.dim : (k + 1) * self.dim] = part[:, 0]
        return out

    def user_vectors(self, batch: dict[str, Tensor], fusion: dict[str, float] | None = None) -> Tensor:
        """(B, D): the query of the fused score, ``sum_k w_k q_k`` (``fusion``: objective ->
        weight; default equal weights), so ``user_vectors @ item_vectors().T`` ranks as
        ``eval/retrieval``'s fused ranking does."""
        weights = [1.0 / len(self.objectives)] * len(self.objectives)
        if fusion is not None:
            weights = [float(fusion.get(name, 0.0)) for name in self.objectives]
        queries = self.objective_vectors(batch)
        return torch.einsum("k,bkd->bd", queries.new_tensor(weights), queries)

    def own_queries(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, D): each training row's query of its own objective (``objective`` 1..K). Separate
        towers read only their objective's rows, so a step costs about what one tower's does."""
        lists, objective = [batch[name] for name in self.lists], batch["objective"] - 1
        if self.mask is not None:
            # Each objective's query on its own rows only (a cascade stage's batch is all its
            # objective's: the earlier objectives' masked runs are on no rows).
            pooled, parts = self.tower_list[0].pool(lists), []
            for k in range(len(self.objectives)):
                rows = (objective == k).nonzero().squeeze(1)
                weights = self.mask.visible(k)  # type: ignore[operator]
                parts.append((rows, self._masked_queries(pooled.index_select(0, rows), k, weights)))
            out = parts[0][1].new_zeros(len(objective), self.dim)  # the heads' dtype (autocast)
            for rows, own in parts:
                out = out.index_put((rows,), own)
            return out
        if len(self.towers) == 1:
            queries = self.tower_list[0].user_vectors(lists)
            return queries[torch.arange(len(objective), device=objective.device), objective]
        out = lists[0].new_zeros(len(objective), len(self.towers) * self.dim, dtype=torch.float)
        for k, tower in enumerate(self.tower_list):
            # Every tower runs, on no rows if none are its own: all parameters stay in the graph,
            # as data-parallel training expects.
            rows = (objective == k).nonzero().squeeze(1)
            own = tower.user_vectors([ids.index_select(0, rows) for ids in lists])[:, 0]
            columns = torch.arange(k * self.dim, (k + 1) * self.dim, device=out.device)
            out = out.index_put((rows[:, None], columns), own)
        return out

    def _masked_queries(
        self, pooled: Tensor, k: int, weights: dict[str, Tensor], plain: Tensor | None = None
    ) -> Tensor:
        """(B, dim): objective k's query under the CSMF mask: the user heads run with k's
        ``weights`` (``mask.visible(k)``: elements of later objectives zeroed), or plainly (their
        output ``plain`` if given) when k reads every element it reaches, as the stage's own
        objective does while it trains."""
        user = self.tower_list[0].user
        if weights:
            return functional_call(user, weights, (pooled,))[:, k]
        return (plain if plain is not None else user(pooled))[:, k]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "objective" not in batch:
            return {"scores": self.objective_vectors(batch) @ self.item_vectors().T}
        query, item = self.own_queries(batch), batch["item"]
        if self.negatives is None:
            logits = query @ self.item_vectors().T
            logits[:, 0] = -torch.inf  # the padding item is never a candidate
            return {"logits": logits, "labels": item}
        drawn = torch.randint(1, self.num_items, (self.negatives,), device=item.device)
        positive = (query * self.item_vectors(item)).sum(-1, keepdim=True)
        negative = (query @ self.item_vectors(drawn).T).masked_fill(drawn == item[:, None], -torch.inf)
        return {"logits": torch.cat([positive, negative], dim=1), "labels": torch.zeros_like(item)}
