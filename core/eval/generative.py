"""Generative evaluation: beam search constrained to valid item codes, history excluded inside the search.

A generative recommender (``model/tiger``; MMQ, REG4Rec later) ranks by generating the next
item's code tuple. The evaluator drives it through a small protocol:

* ``model.item_codes``: (num_items, C) long, row 0 = padding (-1), every other row the item's
  unique tuple of C codes, column c in [0, K_c);
* ``model.start(history (B, W)) -> state``: encode each user's history once;
* ``model.next_code_log_probs(state, prefixes (B, M, t)) -> (B, M, K_t)``: log-probabilities of
  level t's codes after each of the M code prefixes of each user.
"""

from __future__ import annotations

from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from rex.config.registry import register
from rex.eval import metrics as M
from rex.eval.evaluators import (
    Decoding,
    Evaluator,
    check_metrics,
    ranking_metrics,
    trim_left_padding,
)
from rex.eval.gather import gather_rows, sum_counts


class GenerativeModel(Protocol):
    """What ``eval/generative`` needs of a model (see the module docstring)."""

    item_codes: Tensor

    def start(self, history: Tensor) -> Any: ...

    def next_code_log_probs(self, state: Any, prefixes: Tensor) -> Tensor: ...


@runtime_checkable
class Search(Protocol):
    """``eval/generative``'s ``search`` (a ``search/...`` component, such as ``search/corp``): ranks
    items by a search of the model's own, for a model whose codes are no ordered tuple.
    ``search(model, history (B, W), beam, seen (B, S) | None) -> (items (B, M), scores (B, M),
    codes (B, M, C))``, as :func:`beam_search` returns them."""

    def __call__(
        self, model: nn.Module, history: Tensor, beam: int, seen: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]: ...


class CodeTrie:
    """Prefix trie of the items' code tuples as dense per-level transition tables.

    A node at depth d is a distinct length-d prefix (the root is node 0 at depth 0).
    ``children[t]`` (nodes_t, K_t) long: the depth-(t + 1) node reached by code k, -1 where no
    item continues the prefix that way; ``node_of[d]`` (num_items,) each item's depth-d node
    (-1 for padding); ``leaves[d]`` (nodes_d,) how many items share that prefix; ``item_of``
    (nodes_C,) the item of each full tuple. Tables hold nodes_t * K_t entries per level, at most
    num_items * max K (about 1.1M for 4,385 items and 256 codes).
    """

    def __init__(self, item_codes: Tensor) -> None:
        if item_codes.dim() != 2 or len(item_codes) < 2:
            raise ValueError(
                f"item_codes must be (num_items, C) with at least one item, got {tuple(item_codes.shape)}"
            )
        codes = item_codes[1:].long()
        if bool((codes < 0).any()):
            raise ValueError("item_codes rows 1.. must be non-negative (row 0 alone is padding)")
        num_items, levels = len(item_codes), codes.shape[1]
        self.levels = levels
        self.code_sizes = [int(size) + 1 for size in codes.max(dim=0).values]
        items = torch.arange(1, num_items, device=codes.device)
        node_of = [torch.zeros(num_items, dtype=torch.long, device=codes.device)]
        self.children: list[Tensor] = []
        self.leaves: list[Tensor] = [torch.tensor([num_items - 1], device=codes.device)]
        for t in range(levels):
            # torch.unique sorts the prefixes, so node ids follow the lexicographic order.
            _, inverse, counts = torch.unique(
                codes[:, : t + 1], dim=0, return_inverse=True, return_counts=True
            )
            table = torch.full(
                (len(self.leaves[t]), self.code_sizes[t]), -1, dtype=torch.long, device=codes.device
            )
            table[node_of[t][items], codes[:, t]] = inverse
            depth = torch.full((num_items,), -1, dtype=torch.long, device=codes.device)
            depth[items] = inverse
            node_of.append(depth)
            self.children.append(table)
            self.leaves.append(counts)
        if len(self.leaves[-1]) != num_items - 1:
            raise ValueError("item_codes rows must be unique: two items share a code tuple")
        node_of[0][0] = -1
        self.node_of = node_of
        self.item_of = torch.empty(num_items - 1, dtype=torch.long, device=codes.device)
        self.item_of[node_of[levels][items]] = items

    def dead_keys(self, history: Tensor) -> list[Tensor]:
        """Per depth d = 1..C, sorted keys ``row * nodes_d + node`` of the (B, W) ``history`` rows'
        depth-d nodes whose every item is in the row's history (at depth C: the history's items)."""
        rows = torch.arange(len(history), device=history.device)[:, None].expand_as(history)
        pairs = torch.unique(rows[history > 0] * len(self.node_of[0]) + history[history > 0].long())
        row, item = pairs // len(self.node_of[0]), pairs % len(self.node_of[0])
        keys = []
        for depth in range(1, self.levels + 1):
            nodes = len(self.leaves[depth])
            node_keys, counts = torch.unique(row * nodes + self.node_of[depth][item], return_counts=True)
            keys.append(node_keys[counts == self.leaves[depth][node_keys % nodes]])
        return keys


@torch.no_grad()
def beam_search(
    model: GenerativeModel,
    trie: CodeTrie,
    history: Tensor,
    beam: int,
    seen: Tensor | None,
    decoding: Decoding | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``beam`` best valid code tuples per user, best first, given the (B, W) ``history``
    window and, when the history is excluded, ``seen`` (B, S): every item of it.

    Returns ``items`` (B, M) long (0 where a slot is empty: fewer than ``beam`` allowed items),
    ``scores`` (B, M) float, the summed code log-probs (-inf in empty slots), and ``codes``
    (B, M, C) long, the generated tuples; M <= ``beam``. At each level the M live prefixes
    are extended by every code (its log-prob first passed through ``decoding``, fitted, as
    step t, when given), a code is allowed only if the trie has the child and (with
    ``seen``) the child still has an item outside ``seen``, and the
    ``beam`` best allowed extensions survive. With ``beam`` >= the number of items, no allowed
    prefix is ever dropped and the result is the exact ranking of every allowed item.
    """
    b, device = len(history), history.device
    state = model.start(history)
    dead = trie.dead_keys(seen) if seen is not None else None
    rows = torch.arange(b, device=device)[:, None, None]
    nodes = torch.zeros(b, 1, dtype=torch.long, device=device)
    scores = torch.zeros(b, 1, device=device)
    prefixes = torch.zeros(b, 1, 0, dtype=torch.long, device=device)
    for t in range(trie.levels):
        log_probs = model.next_code_log_probs(state, prefixes).float()  # (B, m, K_t)
        if decoding is not None:
            log_probs = decoding(log_probs, t)
        size = log_probs.shape[-1]
        child = trie.children[t][nodes.clamp(min=0)]  # (B, m, K_t); dead beams masked by score
        allowed = (child >= 0) & torch.isfinite(scores)[..., None]
        if dead is not None:
            nodes_next = len(trie.leaves[t + 1])
            allowed &= ~_member(rows * nodes_next + child.clamp(min=0), dead[t])
        candidates = (scores[..., None] + log_probs).masked_fill(~allowed, -torch.inf).flatten(1)
        scores, index = candidates.topk(min(beam, candidates.shape[1]), dim=1)
        parent, code = index // size, index % size
        nodes = child.flatten(1).gather(1, index)
        prefixes = torch.cat(
            [prefixes.gather(1, parent[..., None].expand(-1, -1, t)), code[..., None]], dim=2
        )
    found = torch.isfinite(scores)
    items = torch.where(found, trie.item_of[nodes.clamp(min=0)], 0)
    return items, scores, prefixes


def _member(keys: Tensor, sorted_keys: Tensor) -> Tensor:
    """Whether each of ``keys`` (any shape) is in the sorted 1-D ``sorted_keys``: a binary search
    per key, where ``torch.isin`` would sort the (B, M, K) keys too."""
    if not len(sorted_keys):
        return torch.zeros_like(keys, dtype=torch.bool)
    position = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
    return sorted_keys[position] == keys


@register("eval/generative")
class GenerativeEvaluator(Evaluator):
    """Ranks by constrained beam search: the target's rank is its position among the beams.

    Batches hold ``history`` (B, W) left-padded ids, the model's window, ``seen`` (B, S), the
    user's whole history, and ``target`` (B,). The model implements the
    generation protocol of this module; the prefix trie is built from ``model.item_codes``.
    Rows are searched ``chunk_rows`` at a time, grouped by history length.
    With ``exclude_history`` a tuple of an item in ``seen`` never takes a beam slot, nor does a
    prefix all of whose items are in it. A target outside the ``beam`` results is a
    miss, so every cut-off must be at most ``beam``. Besides the ranking metrics (recall, ndcg,
    mrr, hit @k), ``compute`` reports ``invalid_beams`` and ``duplicate_beams``: the share of
    returned beams whose code tuple is no item's, and that repeat an item already returned for
    the user (0 when the constraints hold; checked against ``item_codes`` independently of the
    trie). ``decoding`` (a ``decoding/...`` component, fitted once per pass on the model's
    ``output_tables()``, one per code level) transforms each level's log-probs in the search.
    ``search`` (a ``search/...`` component) replaces the trie's beam search with the model's own
    (``search/corp`` for ``model/reg4rec``'s unordered tokens); the beams are checked alike.
    """

    def __init__(
        self,
        metrics: list[str],
        exclude_history: bool,
        beam: int = 20,
        chunk_rows: int = 256,
        decoding: Decoding | None = None,
        search: Search | None = None,
    ) -> None:
        self.metric_names = check_metrics(metrics, {"recall", "ndcg", "mrr", "hit"}, "eval/generative")
        if decoding is not None and search is not None:
            raise ValueError("eval/generative takes a decoding or a search, not both")
        if isinstance(beam, bool) or beam < 1:
            raise ValueError(f"beam must be a positive integer, got {beam!r}")
        too_deep = [name for name in metrics if (M.parse_metric_name(name)[1] or 0) > beam]
        if too_deep:
            raise ValueError(
                f"eval/generative returns {beam} beams, so it cannot compute {', '.join(too_deep)}: "
                f"raise beam to at least the largest cut-off or lower the cut-off"
            )
        if isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.exclude_history = exclude_history
        self.beam = beam
        self.chunk_rows = chunk_rows
        self.decoding = decoding
        self.search = search
        self._trie: CodeTrie | None = None
        self._codes: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self._ranks: list[Tensor] = []
        self._returned = 0
        self._invalid = 0
        self._duplicate = 0
        super().reset()

    def trie(self, item_codes: Tensor) -> CodeTrie:
        """The trie of ``item_codes``, rebuilt only when the model's codes tensor changes."""
        if self._trie is None or self._codes is not item_codes:
            self._trie, self._codes = CodeTrie(item_codes), item_codes
        return self._trie

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        item_codes = getattr(model, "item_codes", None)
        if not isinstance(item_codes, Tensor):
            raise ValueError(
                "eval/generative needs a generative model with an item_codes tensor (model/tiger)"
            )
        history, target = batch["history"], batch["target"].long()
        trie = self.trie(item_codes)
        self.fit_decoding_once(model, "eval/generative")
        # Rows sorted by history length and searched chunk by chunk, each cut to its own longest
        # history: most histories are short, and a batch padded to its longest one would encode
        # several times more padding than items.
        for rows in torch.argsort((history != 0).sum(dim=1)).split(self.chunk_rows):
            chunk = trim_left_padding(history[rows])
            seen = trim_left_padding(batch["seen"][rows]) if self.exclude_history else None
            if self.search is not None:
                items, scores, codes = self.search(model, chunk, self.beam, seen)
            else:
                items, scores, codes = beam_search(
                    cast(GenerativeModel, model), trie, chunk, self.beam, seen, self.decoding
                )
            hit = items == target[rows].to(items.device)[:, None]
            ranks = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), self.beam)
            self._ranks.append(ranks.cpu())
            self._check_beams(item_codes, codes, torch.isfinite(scores))

    def _check_beams(self, item_codes: Tensor, codes: Tensor, returned: Tensor) -> None:
        # Each tuple as one mixed-radix number, looked up among the items' sorted numbers.
        table = item_codes[1:].long()
        radix = torch.ones(table.shape[1], dtype=torch.long, device=table.device)
        sizes = table.max(dim=0).values + 1
        for c in range(table.shape[1] - 2, -1, -1):
            radix[c] = radix[c + 1] * sizes[c + 1]
        known, order = torch.sort(table @ radix)
        wanted = codes.long() @ radix
        position = torch.searchsorted(known, wanted).clamp(max=len(known) - 1)
        valid = (known[position] == wanted) & (codes < sizes).all(dim=-1) & returned
        item = torch.where(valid, order[position] + 1, 0)
        ordered, _ = item.sort(dim=1)
        repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] > 0)
        self._returned += int(returned.sum())
        self._invalid += int((returned & ~valid).sum())
        self._duplicate += int(repeats.sum())

    def compute(self) -> dict[str, float]:
        out = ranking_metrics(gather_rows(torch.cat(self._ranks)), self.metric_names, None)
        returned, invalid, duplicate = sum_counts(self._returned, self._invalid, self._duplicate)
        share = max(returned, 1)
        out["invalid_beams"] = invalid / share
        out["duplicate_beams"] = duplicate / share
        return out
