"""REG4Rec: reasoning-enhanced generative recommendation over unordered semantic tokens
(arXiv:2508.15308)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.checks import at_least
from rex.components.decoding.corp import path_search
from rex.components.models.tiger import Tiger
from rex.config.registry import Factory, register


@register("model/reg4rec")
class Reg4Rec(Tiger):
    """``model/tiger``'s encoder-decoder, generating an item's C tokens as a reasoning path: the
    tokens in any order, one per codebook (MPQ's codes are parallel, so no order is given).

    **Tokens.** As ``model/tiger``: code k of column c is token ``c * K + k`` (``item_tokens``
    (num_items, C)), so a token names its codebook and the decoder can take the codebooks in
    any order; decoder step i adds the i-th step embedding. Every column of ``item_codes`` is a
    codebook here, the tokenizer's disambiguation column included.

    **Training batch** (task next_item, as ``model/tiger``): ``items`` and ``targets`` (B, W).
    Each of the P supervised positions decodes its target's tokens in a fresh random order
    (teacher forcing), so every order is learnt. Returns ``logits`` (P * C, C * K) over the
    whole vocabulary and ``labels`` (P * C,); generation masks what training leaves to be
    learnt (codebooks already used, codes a codebook lacks).

    **Preference alignment** (``paths`` > 0; the reasoning stage). A frozen reference copy, set
    to the policy's weights at its first forward (after ``init_from``) and checkpointed with it,
    searches ``paths`` CORP-consistent paths per position of ``pair_rows`` random rows of the
    batch (:func:`path_search`). A path's reward
    (PARS) is the share of its tokens the target holds, plus MSRA's ``discount ** s`` times the
    share the item ``s`` steps later in the user's sequence holds, s = 1 .. ``horizon``. The
    best- and worst-rewarded paths of a position (when their rewards differ) form a preference
    pair; returned are ``chosen_log_ratio`` and ``rejected_log_ratio`` (pairs,), log
    pi(path) - log pi_ref(path), for ``loss/dpo``.

    **Generation** (``search/corp`` drives it): ``start(history)`` as ``model/tiger``;
    ``next_token_log_probs(state, paths (B, M, t)) -> (B, M, C * K)``.
    """

    def __init__(
        self,
        item_codes: Tensor,
        max_len: int,
        encoder: Factory[nn.Module],
        decoder: Factory[nn.Module],
        cross_attention: Factory[nn.Module],
        dim: int = 64,
        num_heads: int = 2,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        dropout: float = 0.1,
        chunk_rows: int = 64,
        paths: int = 0,
        horizon: int = 0,
        discount: float = 0.5,
        pair_rows: int = 64,
    ) -> None:
        super().__init__(
            item_codes, max_len, encoder, decoder, cross_attention,
            dim, num_heads, encoder_layers, decoder_layers, dropout, chunk_rows,
        )  # fmt: skip
        at_least(0, paths=paths, horizon=horizon)
        at_least(1, pair_rows=pair_rows)
        if paths == 1:
            raise ValueError("paths must be 0 (no preference pairs) or at least 2 (a pair to rank)")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        self.paths, self.horizon, self.discount, self.pair_rows = paths, horizon, discount, pair_rows
        levels = torch.arange(self.vocab_size) // self.width
        codes = torch.arange(self.vocab_size) % self.width
        self.register_buffer("token_level", levels, persistent=False)
        self.register_buffer("real_token", codes < torch.tensor(self.code_sizes)[levels], persistent=False)
        self.token_level: Tensor
        self.real_token: Tensor
        self.reference: Reg4Rec | None = None
        if paths:
            reference = copy.deepcopy(self)
            reference.requires_grad_(False)
            self.reference = reference
            self.register_buffer("reference_synced", torch.tensor(False))
            self.reference_synced: Tensor
            self.outputs = self.outputs | {"chosen_log_ratio", "rejected_log_ratio"}

    def step_logits(self, hidden: Tensor) -> Tensor:
        """(..., dim) decoder states → (..., C * K) logits over every codebook's tokens."""
        return hidden @ self.token_embedding.weight[: self.vocab_size].T

    def masked_log_probs(self, logits: Tensor, used: Tensor) -> Tensor:
        """(..., V) logits, (..., C) bool codebooks used so far → log-probs over the open tokens."""
        closed = used[..., self.token_level] | ~self.real_token
        return F.log_softmax(logits.float().masked_fill(closed, -torch.inf), dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "targets" not in batch:
            raise ValueError("model/reg4rec ranks by generation: evaluate it with eval/generative")
        items, targets = batch["items"], batch["targets"]
        valid = targets > 0
        memory = self.encode_positions(items, valid)
        target_tokens = self.item_tokens[targets[valid].long()]  # (P, C)
        order = torch.rand(target_tokens.shape, device=items.device).argsort(dim=1)
        shuffled = target_tokens.gather(1, order)
        hidden = self.decode_tokens(memory, None, shuffled[:, :-1])
        out = {
            "logits": self.step_logits(hidden).reshape(-1, self.vocab_size),
            "labels": shuffled.reshape(-1),
        }
        if self.reference is not None:
            out.update(self.preference_pairs(items, targets, valid, memory))
        return out

    def path_log_probs(self, memory: Tensor, paths: Tensor) -> Tensor:
        """(P, C, dim) memory, (P, M, C) paths → (P, M) the paths' summed masked log-probs."""
        p, m, c = paths.shape
        flat = paths.reshape(p * m, c)
        hidden = self.decode_tokens(memory.repeat_interleave(m, dim=0), None, flat[:, :-1])
        steps = F.one_hot(self.token_level[flat], self.levels)  # (P * M, C steps, C codebooks)
        used = (steps.cumsum(1) - steps) > 0  # codebooks used before each step
        log_probs = self.masked_log_probs(self.step_logits(hidden), used)
        return log_probs.gather(-1, flat[..., None]).squeeze(-1).sum(-1).reshape(p, m)

    def preference_pairs(
        self, items: Tensor, targets: Tensor, valid: Tensor, memory: Tensor
    ) -> dict[str, Tensor]:
        reference = self.reference
        assert reference is not None
        if not bool(self.reference_synced):
            own = {k: v for k, v in self.state_dict().items() if not k.startswith("reference")}
            reference.load_state_dict(own)
            self.reference_synced.fill_(True)
        reference.eval()
        # The search costs a beam over every item per position: pairs come from ``pair_rows``
        # random rows of the batch, the teacher forcing from all of them.
        rows = torch.randperm(len(items), device=items.device)[: self.pair_rows].sort().values
        picked = torch.zeros_like(valid)
        picked[rows] = valid[rows]
        memory = memory[picked[valid]]
        items, targets, valid = items[rows], targets[rows], valid[rows]
        with torch.no_grad():
            reference_memory = reference.encode_positions(items, valid)
            candidates = torch.ones(
                len(reference_memory), len(self.item_tokens), dtype=torch.bool, device=items.device
            )
            candidates[:, 0] = False
            state = {"memory": reference_memory, "mask": None}
            paths, reference_scores, _ = path_search(reference, state, self.paths, candidates)
            rewards = self.rewards(paths, targets, valid)
        best, worst = rewards.argmax(1), rewards.argmin(1)
        rows = torch.arange(len(paths), device=paths.device)
        keep = (rewards[rows, best] > rewards[rows, worst]) & torch.isfinite(reference_scores).all(1)
        pair = torch.stack([best, worst], 1)[keep]
        chosen = paths[keep].gather(1, pair[..., None].expand(-1, -1, paths.shape[2]))  # (pairs, 2, C)
        policy = self.path_log_probs(memory[keep], chosen)
        ratio = policy - reference_scores[keep].gather(1, pair)
        return {"chosen_log_ratio": ratio[:, 0], "rejected_log_ratio": ratio[:, 1]}

    def rewards(self, paths: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """(P, M, C) paths → (P, M) rewards: the target's shared tokens (PARS) plus the discounted
        shared tokens of the next ``horizon`` items (MSRA), each as a share of C."""
        total = torch.zeros(paths.shape[:2], device=paths.device)
        for step in range(self.horizon + 1):
            later = F.pad(targets[:, step:], (0, step))[valid].long()  # 0 past the sequence's end
            held = self.item_tokens[later]  # padding's tokens match no path token
            shared = (paths[..., :, None] == held[:, None, None, :]).any(-1).float().mean(-1)
            total += self.discount**step * shared
        return total

    # ------------------------------------------------------------------ generation protocol
    def next_token_log_probs(self, state: dict[str, Tensor], paths: Tensor) -> Tensor:
        """(B, M, t) paths, t < C → (B, M, C * K) next-token log-probs; -inf for the codebooks a
        path used and for codes a codebook lacks."""
        b, m, t = paths.shape
        memory = state["memory"][:, None].expand(b, m, -1, -1).reshape(b * m, self.levels, self.dim)
        mask = state["mask"]
        if mask is not None:
            mask = mask[:, None].expand(b, m, -1).reshape(b * m, self.levels)
        hidden = self.decode_tokens(memory, mask, paths.reshape(b * m, t))[:, -1]
        used = torch.zeros(b * m, self.levels, dtype=torch.bool, device=paths.device)
        used.scatter_(1, self.token_level[paths.reshape(b * m, t)], True)
        return self.masked_log_probs(self.step_logits(hidden), used).reshape(b, m, -1)
