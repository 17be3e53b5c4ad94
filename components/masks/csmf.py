"""CSMF's selective masks: Cascaded Selective Mask Fine-tuning (Deng et al., SIGIR 2025,
arXiv:2504.12920) for multi-objective embedding-based retrieval.

Objectives are learnt one stage at a time in cascade order (view, then cart, then buy). Every
parameter element is owned by one objective; a stage trains only the elements its objective owns
(its gradients are masked to them), so the network never grows and every other element stays bit
for bit as the earlier stages left it. After a stage, a share of the elements it trained, the
ones it used least, is freed for the next objective. Objective k reads only the elements owned by
objectives up to k: the model runs the split submodule (the two-tower model's user heads) once
per objective with ``visible(k)``, its weights with every later objective's elements zeroed. So a
later stage, which trains only elements freed past k, never changes objective k's outputs: from
the end of its stage (once its freed elements are released) they stay bit for bit.

Our reading of the paper, kept to its simplest faithful form:

* **Which elements are freed.** The paper's Cumulative Percentile-based Pruning (CPP) ranks each
  layer's units by their information value and frees, layer by layer, the low-value ones whose
  cumulative value stays within a percentile, so a layer with many weak units frees more. Here
  the value is an element's magnitude and the unit the element: in each shared tensor, the
  elements the stage's objective owns are sorted by |w| and the smallest are freed while their
  cumulative |w| is at most ``share`` of the tensor's total (of those elements).
* **What an objective owns to start with.** Parameters under a module keyed by an objective's
  name (``heads.cart``, ``gates.buy``) are that objective's from the start, since no other output
  reads them; every other (shared) element belongs to the first objective. Only shared tensors
  under the split submodule free elements: the rest (the two-tower model's item embeddings and
  item tower) is read by every objective through one table of item vectors, so it stays the
  first objective's and is frozen after its stage, and serving keeps one item index.
* **Freed elements are pruned for the earlier objectives, not reset.** From the release on, an
  objective reads its freed elements as zero (the paper's pruning); the next objective starts
  from their trained values.
* **Accuracy recovery is a stage, not a mode.** The paper then fine-tunes the kept elements on
  the objective's own data to win back what the pruning cost. The same mask does it: a stage of
  the same objective over the released ownership trains exactly the elements it kept, reads the
  freed ones as zero, and passes the ownership on as it is (``export: {csmf_owner:
  mask.owner}``; ``recipes/csmf_recovery.yaml``). An objective's outputs then change at its
  release and through its recovery, and never after.

The stages pass the ownership on through the core's exports: a stage's ``export:
{csmf_owner: mask.release}`` writes it, and the next stage's ``mask/csmf`` receives it by name.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from rex.config.registry import register


@register("mask/csmf")
class CSMFMask(nn.Module):
    """CSMF's selective mask over a model's parameters: this stage trains only the elements that
    ``objective`` owns (see :mod:`rex.components.masks.csmf`).

    ``csmf_owner`` (the previous stage's export; ``null`` in the first stage) is the owning
    objective's index of every parameter element, flat in ``named_parameters()`` order.
    ``release()`` returns it with ``share`` (CPP, of each shared tensor's |w|) of this
    objective's shared elements given to the next objective. The model calls
    ``attach(model, split)`` once it is built and runs its ``split`` submodule for objective k
    with ``visible(k)``. Training must not decay weights (an optimizer's weight decay would move
    masked elements): use Adam or AdamW with ``weight_decay: 0``.
    """

    owner: Tensor  # (elements,) int8, the buffer attach() fills
    trainable: Tensor  # (elements,) bool: owner == this stage's objective

    def __init__(
        self, objectives: list[str], objective: str, csmf_owner: Tensor | None, share: float = 0.3
    ) -> None:
        super().__init__()
        if objective not in objectives:
            raise ValueError(
                f"objective must be one of the model's objectives {objectives}, got {objective!r}"
            )
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be in (0, 1), got {share}")
        self.objectives = list(objectives)
        self.index = self.objectives.index(objective)
        self.share = share
        self.given = csmf_owner
        self.spans: dict[str, tuple[int, int]] = {}
        self._params: list[tuple[str, nn.Parameter]] = []  # the model's, not registered here

    def owner_of(self, name: str) -> int | None:
        """The objective whose own module holds parameter ``name``; None for a shared one."""
        parts = name.split(".")
        owners = [k for k, objective in enumerate(self.objectives) if objective in parts]
        return owners[0] if len(owners) == 1 else None

    def attach(self, model: nn.Module, split: str) -> None:
        """Read the model's parameters, set their ownership and mask this stage's gradients.

        ``split`` names the submodule each objective reads through its own forward mask (the
        model evaluates it once per objective with ``visible(k)``): only its shared tensors
        free elements to later objectives. Every other parameter is its objective's, or the
        first objective's whole, and so frozen after the first stage: a later objective training
        it would change what the earlier ones read.

        A parameter this objective owns no element of is frozen (``requires_grad=False``, so no
        optimizer holds it); one it owns some of keeps the gradients of those elements only."""
        self._params = [(name, p) for name, p in model.named_parameters()]
        self.split = split
        start = 0
        for name, p in self._params:
            self.spans[name] = (start, start + p.numel())
            start += p.numel()
        if not any(self._splits(name) for name, _ in self._params):
            raise ValueError(f"the model has no parameters under {split!r} to split between objectives")
        if self.given is None:
            owner = torch.cat(
                [torch.full((p.numel(),), self.owner_of(n) or 0, dtype=torch.int8) for n, p in self._params]
            )
        else:
            if self.given.dim() != 1 or len(self.given) != start:
                raise ValueError(
                    f"csmf_owner must hold one entry per parameter element ({start:,}), got "
                    f"{tuple(self.given.shape)}: is the previous stage's model the same?"
                )
            owner = self.given.to(torch.int8)
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("trainable", owner == self.index, persistent=False)
        for name, p in self._params:
            begin, end = self.spans[name]
            mine = self.trainable[begin:end]
            if not bool(mine.any()):
                p.requires_grad_(False)
            elif not bool(mine.all()):
                p.register_hook(partial(self._mask_grad, name))
        # Objective k's forward masks: in each tensor under `split` that k reads only part of
        # (some elements are a later objective's), those later elements, which k reads as zero.
        # Kept as buffers so they follow the model's device; a tensor k reads whole (or not at
        # all, another objective's head) needs none, so objective k's forward costs a plain one
        # while no element has been released past it.
        self._visible: list[list[tuple[str, str]]] = [[] for _ in self.objectives]
        prefix = f"{split}."
        for name, p in self._params:
            if not self._splits(name):
                continue
            begin, end = self.spans[name]
            owners = self.owner[begin:end]
            for k in range(len(self.objectives)):
                hidden = owners > k
                if bool(hidden.any()) and not bool(hidden.all()) and self.owner_of(name) is None:
                    buffer = f"hidden_{k}_{len(self._visible[k])}"
                    self.register_buffer(buffer, hidden.view_as(p), persistent=False)
                    self._visible[k].append((name[len(prefix) :], buffer))

    def _splits(self, name: str) -> bool:
        return name.startswith(f"{self.split}.")

    def visible(self, k: int) -> dict[str, Tensor]:
        """Objective ``k``'s weights for the tensors of the ``split`` submodule it reads only in
        part (names relative to it): each with the elements of later objectives zeroed, to pass
        to ``torch.func.functional_call``. Empty while k reads every element it reaches."""
        params = dict(self._params)
        prefix = f"{self.split}."
        # masked_fill, not a product: a later objective's non-finite element must read as 0 too
        return {
            name: params[prefix + name].masked_fill(getattr(self, buffer), 0)
            for name, buffer in self._visible[k]
        }

    def _mask_grad(self, name: str, grad: Tensor) -> Tensor:
        begin, end = self.spans[name]
        # masked_fill, not a product: a non-finite gradient must not reach a frozen element
        return grad.masked_fill(~self.trainable[begin:end].view_as(grad), 0)

    @torch.no_grad()
    def release(self) -> Tensor:
        """(elements,) int64: the ownership with ``share`` of this objective's shared elements,
        the smallest |w| of each tensor (CPP), handed to the next objective."""
        if self.index + 1 >= len(self.objectives):
            raise ValueError(
                f"{self.objectives[self.index]} is the last objective: nothing follows to free for"
            )
        owner = self.owner.long().clone()
        for name, p in self._params:
            if self.owner_of(name) is not None or not self._splits(name):
                continue
            begin, end = self.spans[name]
            mine = (owner[begin:end] == self.index).nonzero().squeeze(1)
            magnitude = p.detach().flatten().abs().float()[mine]
            order = torch.argsort(magnitude, stable=True)
            cumulative = torch.cumsum(magnitude[order], 0)
            freed = mine[order[cumulative <= self.share * magnitude.sum()]]
            owner[begin + freed] = self.index + 1
        return owner

    def extra_repr(self) -> str:
        return f"objective={self.objectives[self.index]}, share={self.share}"
