"""DGenCTR (Zhang et al., 2025, arXiv:2508.14500): a CTR sample as discrete tokens, pre-trained by
masked discrete diffusion and fine-tuned on its label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rex.config.registry import Factory, register

RESTORE_OUTPUTS = ("restore_nll", "restore_mask", "restore_weight")


@register("model/dgenctr")
class DGenCTR(nn.Module):
    """A CTR sample's feature fields and its click label as one set of tokens, a bidirectional
    transformer over them, and a softmax per token over its own field's vocabulary.

    Tokens: each field's id through ``embed`` (``embedding/field``, ``dim`` wide), then the label
    (0 or 1) through a 2-row table; each of the F + 1 positions has its own learnt mask token,
    the absorbing state. ``encoder`` (``encoder/transformer``, built ``dim`` wide) must not be
    causal: a field is restored from every other. The output of position i is scored against
    field i's embedding rows (tied weights) plus a bias per id, a softmax over that field's
    vocabulary alone; for the label, two rows, so its logit is the difference of the two scores
    and its softmax cross-entropy is the BCE of that logit.

    With ``corruption`` (``denoiser/absorbing``) a training batch is the pre-training objective:
    the forward process masks each token of each row at the row's time t, and the model returns
    ``restore_nll`` (B, F + 1), the masked tokens' negative log-likelihoods (0 where unmasked:
    only masked tokens are scored), ``restore_mask`` (B, F + 1) and ``restore_weight`` (B,),
    the ELBO weight of each row's t (``loss/masked_diffusion`` reads them). Otherwise, and in
    evaluation always, it answers the CTR question: every feature visible, the label token
    masked, ``logit`` (B,) from the label position. So the pre-trained model already predicts
    clicks (stage 1's validation AUC), and fine-tuning changes only the objective: every
    parameter carries over (the paper's full transfer). The batch's label is never read then.
    """

    def __init__(
        self,
        fields: dict[str, int],
        embed: Factory[nn.Module],
        encoder: Factory[nn.Module],
        corruption: Factory[nn.Module] | None = None,
        use_fields: list[str] | None = None,
        label: str = "label",
    ) -> None:
        super().__init__()
        if use_fields is not None:
            unknown = sorted(set(use_fields) - set(fields))
            if unknown:
                raise ValueError(f"use_fields {unknown} are not in the dataset's fields {sorted(fields)}")
            fields = {name: fields[name] for name in use_fields}
        self.fields = dict(fields)
        self.label = label
        self.embed = embed(fields=self.fields)
        dim = self.embed.dim
        self.encoder = encoder(dim=dim)
        if getattr(self.encoder, "causal", False):
            raise ValueError(
                "model/dgenctr needs a bidirectional encoder (causal: false): fields have no order"
            )
        self.label_embedding = nn.Embedding(2, dim)
        nn.init.normal_(self.label_embedding.weight, std=0.01)
        self.mask_tokens = nn.Parameter(torch.randn(len(self.fields) + 1, dim) * 0.01)
        # One output bias per id (the id's prior), fields in order, then the label's two.
        self.output_bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(size)) for size in [*self.fields.values(), 2]]
        )
        self.corruption = corruption() if corruption is not None else None
        self.outputs = frozenset({"logit", *(RESTORE_OUTPUTS if self.corruption is not None else ())})

    def _scores(self, position: int, hidden: Tensor) -> Tensor:
        """(P, d) outputs of one position -> (P, V) scores over that position's vocabulary."""
        if position < len(self.fields):
            name = list(self.fields)[position]
            table = self.embed.lookup(name, torch.arange(self.fields[name], device=hidden.device))
        else:
            table = self.label_embedding.weight
        return hidden @ table.T + self.output_bias[position]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = self.embed(batch)  # (B, F, d), fields in order
        rows = features.shape[0]
        if not (self.training and self.corruption is not None):
            # Fields visible, label masked; only the label position is read.
            masked_label = self.mask_tokens[-1].expand(rows, 1, -1).to(features.dtype)
            hidden = self.encoder(torch.cat([features, masked_label], dim=1), last_only=True)
            scores = self._scores(len(self.fields), hidden[:, -1])
            return {"logit": scores[:, 1] - scores[:, 0]}
        targets = [*(batch[name] for name in self.fields), batch[self.label].long()]
        tokens = torch.cat([features, self.label_embedding(targets[-1])[:, None]], dim=1)
        noisy, masked, t = self.corruption(tokens, self.mask_tokens)
        hidden = self.encoder(noisy)
        # float32 whatever autocast computes the scores in: the loss sums many small terms.
        nll = torch.zeros(masked.shape, device=hidden.device)
        for position, target in enumerate(targets):
            # Scored where masked only: an unmasked token is an input, and its softmax would
            # cost as much as a masked one's.
            index = masked[:, position].nonzero().squeeze(1)
            scores = self._scores(position, hidden[index, position]).float()
            nll = nll.index_put(
                (index, torch.full_like(index, position)),
                F.cross_entropy(scores, target[index], reduction="none"),
            )
        return {"restore_nll": nll, "restore_mask": masked, "restore_weight": self.corruption.elbo_weight(t)}
