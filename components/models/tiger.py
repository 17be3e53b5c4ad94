"""TIGER: generative retrieval over semantic IDs (Rajput et al., NeurIPS 2023, arXiv:2305.05065)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.components.encoders.dropout import Dropout
from rex.config.registry import Factory, register


def check_item_codes(item_codes: Tensor) -> Tensor:
    """``item_codes`` as a (num_items, C) long tensor, or a ValueError saying what is wrong.

    Row 0 is padding (not an item, its values are ignored); every other row is a tuple of C codes,
    column c in [0, K_c), and no two items share a tuple.
    """
    if not isinstance(item_codes, Tensor) or item_codes.dim() != 2:
        raise ValueError(
            f"item_codes must be a (num_items, C) tensor, got {getattr(item_codes, 'shape', item_codes)}"
        )
    if item_codes.is_floating_point() or item_codes.dtype == torch.bool:
        raise ValueError(f"item_codes must be an integer tensor, got {item_codes.dtype}")
    if len(item_codes) < 2 or item_codes.shape[1] < 1:
        raise ValueError(f"item_codes needs at least one item and one code, got {tuple(item_codes.shape)}")
    codes = item_codes.long()
    if bool((codes[1:] < 0).any()):
        raise ValueError("item_codes rows 1.. must be non-negative codes (row 0 alone is padding)")
    if len(torch.unique(codes[1:], dim=0)) != len(codes) - 1:
        raise ValueError(
            "item_codes rows must be unique: add a disambiguation column (RQ-VAE's item_codes does)"
        )
    return codes


@register("model/tiger")
class Tiger(nn.Module):
    """Encoder-decoder over semantic IDs: reads the history as code tokens, generates the next item's C codes.

    **Tokens.** Column c of ``item_codes`` (num_items, C) has K_c codes; with K = max K_c, code
    k of column c is token ``c * K + k``, so each level has its own block of K embeddings. A history item becomes its C tokens, plus a position embedding of its index in the
    history (0 = the oldest item present), shared by its C tokens.

    **Training scheme: every prefix in one pass.** The encoder (``encoder(dim=...)``, an
    ``encoder/transformer``) runs token-causally over the W * C history tokens, so the tokens of
    item i have read items 1..i and nothing later. The next item after position i is then
    decoded from item i's C encoder states, which under that mask summarise the prefix: one
    encoder pass supervises all W prefixes of a sequence, where sampling one cut point per row
    (the paper's bidirectional encoder) would pay the same encoder cost for one example. The
    decoder reads those C states rather than every prefix token (the paper's cross-attention),
    which keeps it O(C^2) per prefix and needs no per-query mask. Generation encodes the full
    history once the same way and decodes from its last item; as positions count from the
    oldest item, the training example at item i is exactly what generation computes from the
    history that ends there.

    **Decoder.** Inputs ``[BOS, code_0, ..., code_{C-2}]`` of the target plus a level
    embedding; each of ``decoder_layers`` layers is a pre-norm residual cross-attention
    (``cross_attention(dim=..., num_heads=..., gated=False)``, an ``attention/cross``) over the
    C encoder states, then ``decoder(dim=..., num_layers=1, causal=True, ...)``, a one-layer
    ``encoder/transformer`` (causal self-attention and FFN). Output logits are tied to the token
    embeddings. ``num_heads``, ``encoder_layers`` and ``dropout`` are passed to the factories;
    a setting in a sub-component's own node wins.

    **Training batch** (task next_item): ``items`` (B, W) left-padded ids and ``targets`` (B, W),
    the next item at each position (0 where the input is padding). Returns ``logits`` (P * C, K)
    and ``labels`` (P * C,) long in [0, K) for the P positions with a target, row ``p * C + c``
    scoring level c's block of tokens against the target's code c, so ``loss/softmax_ce``
    applies as is (label smoothing included). Scoring a level's own block, rather than all C * K
    tokens, is 1/C of the output cost; a block's unused tokens (codes K_c .. K - 1 of a smaller
    column, such as the disambiguation code) stay unmasked, learnt down like the unused tokens of
    TIGER's T5 vocabulary, and generation renormalises over the K_c real codes. Rows are encoded
    ``chunk_rows`` at a time, sorted by length (:meth:`encode_positions`).

    **Generation protocol** (what ``eval/generative`` drives, and any generative recommender
    implements): ``item_codes`` (num_items, C) long buffer, row 0 = -1; ``code_sizes``
    (K_0, ..., K_{C-1}); ``start(history (B, W)) -> state``, encoding once; and
    ``next_code_log_probs(state, prefixes (B, M, t)) -> (B, M, K_t)``, log-probabilities of
    level t's codes after each of M code prefixes per user (t = 0 .. C-1).
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
    ) -> None:
        super().__init__()
        codes = check_item_codes(item_codes)
        if min(max_len, dim, decoder_layers, chunk_rows) <= 0:
            raise ValueError(
                "max_len, dim, decoder_layers and chunk_rows must be positive, "
                f"got {max_len}, {dim}, {decoder_layers}, {chunk_rows}"
            )
        self.chunk_rows = chunk_rows
        self.outputs = frozenset({"logits", "labels"})
        self.dim = dim
        self.levels = codes.shape[1]
        self.code_sizes = tuple(int(size) + 1 for size in codes[1:].max(dim=0).values)
        self.width = max(self.code_sizes)
        self.vocab_size = self.levels * self.width
        offsets = torch.arange(self.levels) * self.width
        # Padding items read the padding token; rows of real items their offset tokens.
        tokens = torch.where(codes >= 0, codes + offsets, self.vocab_size)
        tokens[0] = self.vocab_size
        self.register_buffer("item_codes", codes.clone())
        self.register_buffer("item_tokens", tokens)
        self.register_buffer("offsets", offsets)
        self.item_codes: Tensor
        self.item_tokens: Tensor
        self.offsets: Tensor
        # C * K code tokens, then padding and the decoder's BOS.
        self.token_embedding = nn.Embedding(self.vocab_size + 2, dim, padding_idx=self.vocab_size)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.level_embedding = nn.Embedding(self.levels, dim)
        self.dropout = Dropout(dropout)
        self.encoder = encoder(
            dim=dim, num_layers=encoder_layers, num_heads=num_heads, dropout=dropout, causal=True
        )
        self.cross = nn.ModuleList(
            cross_attention(dim=dim, num_heads=num_heads, gated=False) for _ in range(decoder_layers)
        )
        self.cross_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(decoder_layers))
        self.blocks = nn.ModuleList(
            decoder(dim=dim, num_layers=1, num_heads=num_heads, dropout=dropout, causal=True)
            for _ in range(decoder_layers)
        )
        if not all(getattr(m, "causal", True) for m in [self.encoder, *self.blocks]):
            raise ValueError(
                "model/tiger needs causal encoder and decoder (causal: true): a prefix must not see later codes"
            )
        if any(getattr(m, "gamma", None) is not None for m in self.cross):
            raise ValueError(
                "model/tiger needs cross_attention with gated: false; the decoder adds its own residual"
            )
        nn.init.normal_(self.token_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.token_embedding.weight[self.vocab_size].zero_()

    # ------------------------------------------------------------------ encoder and decoder
    def encode(self, items: Tensor) -> Tensor:
        """(B, W) left-padded item ids → (B, W, C, dim) encoder states (zero at padding items)."""
        b, width = items.shape
        max_len = self.position_embedding.num_embeddings
        if width > max_len:
            raise ValueError(f"sequence length {width} exceeds max_len {max_len}")
        tokens = self.item_tokens[items.long()]  # (B, W, C)
        x = self.token_embedding(tokens) * math.sqrt(self.dim)
        # Positions count from the oldest item, so the prefix ending at item i is encoded exactly
        # as generation encodes a history that ends there (right-anchored positions would shift
        # with every later item of the training sequence).
        positions = ((items != 0).long().cumsum(dim=1) - 1).clamp(min=0)
        x = x + self.position_embedding(positions)[:, :, None, :]
        padding = (items == 0)[:, :, None].expand(b, width, self.levels).reshape(b, width * self.levels)
        hidden = self.encoder(self.dropout(x.reshape(b, width * self.levels, self.dim)), padding)
        return hidden.reshape(b, width, self.levels, self.dim)

    def encode_positions(self, items: Tensor, positions: Tensor) -> Tensor:
        """Encoder states (P, C, dim) of the P items where ``positions`` (B, W) bool is True, in
        row-major order, encoding ``chunk_rows`` rows of similar length at a time.

        Sorted by length, each chunk is cut to its own longest sequence: with Scientific's
        lengths (mean 5, a batch maximum near 30) most of a batch's tokens are padding, and
        chunks of 64 rows encode about a third of them. Positions count from the oldest item,
        so cutting padding changes no output.
        """
        lengths = (items != 0).sum(dim=1)
        flat = torch.arange(items.numel(), device=items.device).reshape(items.shape)
        parts, where = [], []
        for rows in torch.argsort(lengths).split(self.chunk_rows):
            width = max(int(lengths[rows].max()), 1)
            chosen = positions[rows, -width:]
            parts.append(self.encode(items[rows, -width:])[chosen])
            where.append(flat[rows, -width:][chosen])
        return torch.cat(parts)[torch.argsort(torch.cat(where))]

    def decode(self, memory: Tensor, memory_mask: Tensor | None, codes: Tensor) -> Tensor:
        """Decoder states (N, t + 1, dim) for BOS and the given codes (N, t), t < C, over memory (N, C, dim).

        ``memory_mask`` (N, C) bool, True = a real state, or None when all are real.
        """
        return self.decode_tokens(memory, memory_mask, codes.long() + self.offsets[: codes.shape[1]])

    def decode_tokens(self, memory: Tensor, memory_mask: Tensor | None, tokens: Tensor) -> Tensor:
        """:meth:`decode` over (N, t) tokens, t < C, rather than codes: a token names its level
        (``c * K + k``), so a subclass may feed the levels in any order; step i adds the i-th
        level embedding."""
        n, t = tokens.shape
        bos = torch.full((n, 1), self.vocab_size + 1, dtype=torch.long, device=tokens.device)
        tokens = torch.cat([bos, tokens], dim=1)
        x = self.token_embedding(tokens) * math.sqrt(self.dim) + self.level_embedding.weight[: t + 1]
        x = self.dropout(x)
        for norm, cross, block in zip(self.cross_norms, self.cross, self.blocks, strict=True):
            x = x + self.dropout(cross(norm(x), memory, memory_mask))
            x = block(x)
        return x

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "targets" not in batch:
            raise ValueError("model/tiger ranks by generation: evaluate it with eval/generative")
        items, targets = batch["items"], batch["targets"]
        valid = targets > 0
        memory = self.encode_positions(items, valid)  # (P, C, dim): item i's states decode item i + 1
        target_codes = self.item_codes[targets[valid].long()]  # (P, C)
        hidden = self.decode(memory, None, target_codes[:, :-1])  # (P, C, dim)
        # Level c's state is scored against level c's block of tokens alone: (C, P, width).
        blocks = self.token_embedding.weight[: self.vocab_size].reshape(self.levels, self.width, self.dim)
        logits = torch.bmm(hidden.transpose(0, 1), blocks.transpose(1, 2)).transpose(0, 1)
        return {"logits": logits.reshape(-1, self.width), "labels": target_codes.reshape(-1)}

    # ------------------------------------------------------------------ generation protocol
    def start(self, history: Tensor) -> dict[str, Tensor]:
        """Encode (B, W) left-padded histories once: ``memory`` (B, C, dim), ``mask`` (B, C)."""
        memory = self.encode(history)[:, -1]
        mask = (history[:, -1] != 0)[:, None].expand(-1, self.levels)
        return {"memory": memory, "mask": mask}

    def next_code_log_probs(self, state: dict[str, Tensor], prefixes: Tensor) -> Tensor:
        """(B, M, t) code prefixes per user, t < C → (B, M, K_t) log-probs of level t's codes."""
        b, m, t = prefixes.shape
        if t >= self.levels:
            raise ValueError(f"prefixes of length {t}: items have {self.levels} codes")
        memory = state["memory"][:, None].expand(b, m, -1, -1).reshape(b * m, self.levels, self.dim)
        mask = state["mask"][:, None].expand(b, m, -1).reshape(b * m, self.levels)
        hidden = self.decode(memory, mask, prefixes.reshape(b * m, t))[:, -1]
        start, size = int(self.offsets[t]), self.code_sizes[t]
        logits = hidden @ self.token_embedding.weight[start : start + size].T
        return F.log_softmax(logits.float(), dim=-1).reshape(b, m, size)

    def output_tables(self) -> list[Tensor]:
        """One (K_t, dim) table per code level t: the code embeddings level t's logits are dot
        products with in ``next_code_log_probs`` (for a ``decoding/...`` component)."""
        starts = [int(start) for start in self.offsets[: self.levels]]
        return [
            self.token_embedding.weight[start : start + size]
            for start, size in zip(starts, self.code_sizes, strict=True)
        ]
