"""CORP: consistency-oriented self-reflection for pruning (REG4Rec, arXiv:2508.15308).

A REG4Rec item is an unordered set of C tokens, one per codebook, and a reasoning path is those
tokens in the order the model generates them. The search here drives any model with the
unordered-token protocol:

* ``model.item_tokens``: (num_items, C) long, row i item i's tokens (``c * K + k`` for code k of
  codebook c), row 0 padding; ``model.vocab_size`` = C * K; ``model.levels`` = C;
* ``model.next_token_log_probs(state, paths (B, M, t)) -> (B, M, vocab_size)``: log-probabilities
  of the next token after each path, -inf for the codebooks a path already used;
* ``model.start(history (B, W)) -> state``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rex.config.registry import register


def holders(item_tokens: Tensor, vocab_size: int) -> Tensor:
    """(num_items, C) tokens → (vocab_size, num_items) bool: which items hold each token."""
    table = torch.zeros(vocab_size + 1, len(item_tokens), dtype=torch.bool, device=item_tokens.device)
    items = torch.arange(len(item_tokens), device=item_tokens.device)
    table[item_tokens.clamp(max=vocab_size), items[:, None]] = True  # padding's tokens: the last row
    return table[:vocab_size]


def token_support(candidates: Tensor, item_tokens: Tensor, vocab_size: int) -> Tensor:
    """(..., N) bool candidate items → (..., vocab_size) bool: the tokens some candidate holds.
    Its cost follows the candidates, few once a path holds a token."""
    flat = candidates.reshape(-1, candidates.shape[-1])
    row, item = flat.nonzero(as_tuple=True)
    support = torch.zeros(len(flat), vocab_size + 1, dtype=torch.bool, device=flat.device)
    support[row[:, None], item_tokens[item].clamp(max=vocab_size)] = True  # padding: the last column
    return support[:, :vocab_size].reshape(*candidates.shape[:-1], vocab_size)


def merge_orders(paths: Tensor, scores: Tensor) -> Tensor:
    """(B, Q, t) paths, (B, Q) scores sorted best first → (B, Q) scores where each set of tokens
    is held by its best order alone, scored the log of the summed probability of its orders
    (-inf for the other orders)."""
    radix = (paths.max() + 1).clamp(min=1) ** torch.arange(paths.shape[2], device=paths.device)
    keys = (paths.sort(dim=-1).values * radix).sum(-1)
    order = keys.argsort(dim=1, stable=True)  # within a set, best order first
    ranked, ranked_scores = keys.gather(1, order), scores.gather(1, order)
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    group = first.long().cumsum(1) - 1
    top = ranked_scores.max(dim=1, keepdim=True).values.clamp(min=torch.finfo(scores.dtype).min)
    mass = torch.zeros_like(ranked_scores).scatter_add_(1, group, (ranked_scores - top).exp())
    merged = torch.where(first, mass.gather(1, group).log() + top, -torch.inf)
    return torch.empty_like(merged).scatter_(1, order, merged)


def path_search(
    model: Any, state: Any, beam: int, candidates: Tensor | None, merge: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The ``beam`` best reasoning paths per user: ``paths`` (B, M, C) tokens in generation order,
    ``scores`` (B, M) their summed log-probs (-inf in empty slots), M <= ``beam``.

    With ``candidates`` (B, N) bool (the items a user may be recommended), CORP prunes at every
    step: a token is allowed only if some candidate item holds it and every token already on the
    path, so a finished path's token set is exactly one candidate's; the third result is then
    (B, M, N) bool, each path's remaining candidates. ``None`` searches unconstrained. With
    ``merge``, the orders of one token set share one beam (:func:`merge_orders`), so the beam
    holds ``beam`` distinct sets rather than orders of a few.
    """
    tokens, vocab = model.item_tokens, model.vocab_size
    b = len(candidates) if candidates is not None else len(next(iter(state.values())))
    device = tokens.device
    paths = torch.zeros(b, 1, 0, dtype=torch.long, device=device)
    scores = torch.zeros(b, 1, device=device)
    alive = candidates[:, None] if candidates is not None else None
    held = holders(tokens, vocab) if candidates is not None else None
    for _ in range(model.levels):
        log_probs = model.next_token_log_probs(state, paths).float()  # (B, m, V)
        if alive is not None and held is not None:
            log_probs = log_probs.masked_fill(~token_support(alive, tokens, vocab), -torch.inf)
        extended = (scores[..., None] + log_probs).flatten(1)
        pool = beam * model.levels if merge else beam  # room for several orders of a set
        scores, index = extended.topk(min(pool, extended.shape[1]), dim=1)
        parent, token = index // vocab, index % vocab
        paths = torch.cat(
            [paths.gather(1, parent[..., None].expand(-1, -1, paths.shape[2])), token[..., None]], 2
        )
        if merge:
            scores, keep = merge_orders(paths, scores).topk(min(beam, scores.shape[1]), dim=1)
            paths = paths.gather(1, keep[..., None].expand(-1, -1, paths.shape[2]))
            parent, token = parent.gather(1, keep), token.gather(1, keep)
        if alive is not None and held is not None:
            alive = alive.gather(1, parent[..., None].expand(-1, -1, alive.shape[2])) & held[token]
    return paths, scores, alive


def nearest_items(paths: Tensor, item_tokens: Tensor, allowed: Tensor) -> Tensor:
    """(B, M, C) paths → (B, M) the allowed item (``allowed`` (B, N) bool) sharing the most tokens
    with each path, the lowest id among ties."""
    by_level = paths.sort(dim=-1).values  # a path holds one token per codebook, and tokens sort by codebook
    shared = torch.zeros(*paths.shape[:2], len(item_tokens), device=paths.device)
    for level, column in enumerate(item_tokens.T):
        shared += (column[None, None, :] == by_level[..., level, None]).float()
    return shared.masked_fill(~allowed[:, None], -1.0).argmax(-1)


@register("search/corp")
class ConsistencyPruning(nn.Module):
    """Ranks items by reasoning-path search: ``__call__(model, history (B, W), beam, seen (B, S) |
    None) -> (items (B, M) long, scores (B, M), codes (B, M, C))``, ``eval/generative``'s
    ``search``, best first, 0 / -inf / -1 in empty slots, M <= ``beam``.

    A beam search over paths (:func:`path_search`, ``beam`` token sets kept per step, the orders
    of a set merged into one beam) whose finished paths each reach one item; an item's score is
    the log of the summed probability of the kept paths that reach it, so an item reached in
    several orders gathers them (the paper's aggregation across paths). With ``consistent`` (CORP), paths whose tokens no real item
    outside ``seen`` holds together are pruned at every step, so every kept path reaches an item.
    Without it (the ablation) the search is unconstrained and each path is credited to the item
    outside ``seen`` sharing most of its tokens, as the abstract says nothing of how an
    inconsistent path is read.
    """

    def __init__(self, consistent: bool = True) -> None:
        super().__init__()
        self.consistent = consistent

    @torch.no_grad()
    def forward(
        self, model: Any, history: Tensor, beam: int, seen: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        tokens = model.item_tokens
        allowed = torch.ones(len(history), len(tokens), dtype=torch.bool, device=tokens.device)
        allowed[:, 0] = False
        if seen is not None:
            allowed.scatter_(1, seen.long(), False)  # seen's padding 0 is masked already
        state = model.start(history)
        paths, scores, alive = path_search(
            model, state, beam, allowed if self.consistent else None, merge=True
        )
        # Under CORP exactly one item holds a finished path's tokens.
        items = alive.float().argmax(-1) if alive is not None else nearest_items(paths, tokens, allowed)
        mass = torch.zeros(len(history), len(tokens), dtype=torch.float64, device=tokens.device)
        mass.scatter_add_(1, items, scores.double().exp())  # empty slots add exp(-inf) = 0
        mass[:, 0] = 0.0
        total, ranked = mass.topk(min(beam, mass.shape[1]), dim=1)
        scores = total.log().float()
        ranked = torch.where(total > 0, ranked, 0)
        return ranked, scores, model.item_codes[ranked]
