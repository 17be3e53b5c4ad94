"""CSMF (arXiv:2504.12920) over the shared-bottom two-tower model, on real taobao_mb: the selective
mask and the per-objective forward masks by hand, a real cascade with accuracy recovery whose
stages change exactly the elements their masks leave them (all others bit for bit) and leave the
earlier objectives' queries and scores bit for bit, fusion weights that re-rank at serving time
without retraining, and a kill in the last stage that resumes to the same final metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rex.components.masks.csmf import CSMFMask
from rex.config.recipe import load_recipe
from rex.data.lance_io import read_columns
from rex.data.mirror import mirror_dir
from rex.data.prepare import prepare_dataset
from rex.engine.build import build_run
from rex.engine.export_index import export_index
from rex.engine.runs import load_checkpoint
from rex.engine.stages import stage_contexts
from rex.engine.train import evaluate, train
from rex.eval.retrieval import RetrievalEvaluator
from tests.conftest import REPO, run_rex

pytestmark = pytest.mark.skipif(
    mirror_dir() is None, reason="no data mirror (../shared/data or REX_DATA_MIRROR)"
)

RECIPE = REPO / "recipes" / "csmf.yaml"
RECOVERY_RECIPE = REPO / "recipes" / "csmf_recovery.yaml"
# A short cascade on real data: a few batches per stage and one validation batch.
TINY = [
    "train.batch_size=256",
    "train.limit_train_batches=4",
    "train.limit_eval_batches=1",
    "eval.batch_size=512",
    "logging.progress_bar=false",
    "stages.view.train.max_epochs=1",
    "stages.cart.train.max_epochs=1",
    "stages.buy.train.max_epochs=2",
]
RECOVERY_TINY = [*TINY, "stages.view_recovery.train.max_epochs=1", "stages.cart_recovery.train.max_epochs=1"]
OBJECTIVES = ["view", "cart", "buy"]
# The recovery cascade's stages in order, each with the objective it trains.
STAGES = [("view", 0), ("view_recovery", 0), ("cart", 1), ("cart_recovery", 1), ("buy", 2)]


class _Tiny(nn.Module):
    """A shared layer and one head per objective, named as model/two_tower names them."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 2, bias=False)
        self.heads = nn.ModuleDict({name: nn.Linear(2, 1, bias=False) for name in OBJECTIVES})


def test_the_selective_mask_by_hand() -> None:
    model = _Tiny()
    with torch.no_grad():
        model.shared.weight.copy_(torch.tensor([[0.1, -0.4], [0.2, 0.3]]))
    view = CSMFMask(OBJECTIVES, "view", None, share=0.35)
    view.attach(model, split="shared")
    # Heads are their objective's from the start; shared elements the first objective's.
    assert view.owner.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    assert model.shared.weight.requires_grad and model.heads["view"].weight.requires_grad
    assert not model.heads["cart"].weight.requires_grad and not model.heads["buy"].weight.requires_grad
    # CPP: |w| sorted 0.1, 0.2, 0.3, 0.4 (total 1.0); cumulative 0.1, 0.3 stay within 0.35 of it.
    released = view.release()
    assert released.tolist() == [1, 0, 1, 0, 0, 0, 1, 1, 2, 2]
    # Nothing is released yet, so every objective reads the whole shared layer.
    assert all(view.visible(k) == {} for k in range(3))

    # The next stage builds its model afresh and starts from the same weights.
    later = _Tiny()
    later.load_state_dict(model.state_dict())
    cart = CSMFMask(OBJECTIVES, "cart", released, share=0.35)
    cart.attach(later, split="shared")
    # View reads only its own elements (the freed ones are zero to it), cart and buy all of them.
    weight = later.shared.weight.detach()
    assert torch.equal(cart.visible(0)["weight"], torch.tensor([[0.0, -0.4], [0.0, 0.3]]))
    assert cart.visible(1) == {} and cart.visible(2) == {} and torch.equal(weight, model.shared.weight)
    x = torch.randn(8, 2)
    hidden = later.shared(x)
    (later.heads["cart"](hidden).sum() + later.heads["view"](hidden).sum()).backward()
    # Only the freed shared elements and the cart head learn; the view head is frozen whole.
    grad = later.shared.weight.grad
    assert grad is not None and (grad.flatten()[[1, 3]] == 0).all() and (grad.flatten()[[0, 2]] != 0).all()
    assert later.heads["view"].weight.grad is None and later.heads["cart"].weight.grad is not None
    with pytest.raises(ValueError, match="one entry per parameter element"):
        CSMFMask(OBJECTIVES, "cart", released[:-1]).attach(_Tiny(), split="shared")
    with pytest.raises(ValueError, match="no parameters under 'bottom'"):
        CSMFMask(OBJECTIVES, "view", None).attach(_Tiny(), split="bottom")
    # Accuracy recovery: view again over the released ownership trains only the elements it kept
    # and passes the ownership on unchanged.
    recovery = CSMFMask(OBJECTIVES, "view", released, share=0.35)
    recovery.attach(_Tiny(), split="shared")
    assert recovery.trainable.tolist() == [False, True, False, True, True, True, False, False, False, False]
    assert torch.equal(recovery.owner.long(), released)
    buy = CSMFMask(OBJECTIVES, "buy", cart.release())
    buy.attach(_Tiny(), split="shared")
    with pytest.raises(ValueError, match="last objective"):
        buy.release()


@pytest.fixture(scope="module")
def home(data_home: Path) -> Path:
    """The session's data home, with taobao_mb prepared from the mirror."""
    prepare_dataset("taobao_mb", root=data_home)
    return data_home


@pytest.fixture(scope="module")
def cascade(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short CSMF run with accuracy recovery on real data: view, view_recovery, cart,
    cart_recovery and buy."""
    runs = tmp_path_factory.mktemp("runs")
    return train(RECOVERY_RECIPE, [*RECOVERY_TINY, f"logging.run_root={runs}"])


def _state(run_dir: Path, stage: str, checkpoint: str = "best") -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / stage / "checkpoints" / f"{checkpoint}.ckpt")["state_dict"]
    return {name[len("model.") :]: value for name, value in state.items() if name.startswith("model.")}


def _owner(run_dir: Path, stage: str) -> torch.Tensor:
    path = run_dir / stage / "exports" / "csmf_owner.lance"
    return torch.from_numpy(np.array(read_columns(path, ["value"])["value"]))


def _moved(run_dir: Path, stage: str, trainable: list[str]) -> dict[str, torch.Tensor]:
    """Per trainable parameter, the elements the stage's optimizer ever saw a gradient for: Adam's
    moments are non-zero exactly there (they start at 0 and a zero gradient keeps them 0)."""
    states = load_checkpoint(run_dir / stage / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"]
    return {
        name: (states[i]["exp_avg"] != 0) | (states[i]["exp_avg_sq"] != 0) for i, name in enumerate(trainable)
    }


def test_each_stage_changes_exactly_the_elements_its_mask_gives_it(cascade: Path) -> None:
    record = json.loads((cascade / "stages.json").read_text())
    assert list(record["stages"]) == [name for name, _ in STAGES]
    for (earlier, _), (stage, index) in pairwise(STAGES):
        # The stage starts from the earlier stage's best weights (init_from) and its ownership.
        before, owner = _state(cascade, earlier), _owner(cascade, earlier)
        mask, start = {}, 0
        for name, value in before.items():
            mask[name] = owner[start : start + value.numel()].view_as(value) == index
            start += value.numel()
        assert start == len(owner)
        trainable = [name for name in before if mask[name].any()]  # the others are frozen whole
        moved = _moved(cascade, stage, trainable)
        for checkpoint in ("best", "last"):
            after = _state(cascade, stage, checkpoint)
            for name, value in before.items():
                changed = after[name] != value
                # Every element outside the stage's mask is bit for bit what the earlier stage left...
                assert not (changed & ~mask[name]).any(), f"{stage} changed {name} outside its mask"
                if checkpoint == "last":
                    # ...and the elements that changed are those that learnt: masked elements with
                    # a gradient (a dead ReLU unit's weights get none). An Adam step can round
                    # to no change on a large weight, so a few learners may not have moved.
                    learnt = moved.get(name, torch.zeros_like(changed))
                    assert not (changed & ~learnt).any(), name
                    assert int(changed.sum()) >= 0.999 * int(learnt.sum()), name
        assert sum(int(m.sum()) for m in moved.values()) > 0.5 * sum(int(m.sum()) for m in mask.values())
        if stage.endswith("_recovery"):  # it releases nothing: the next stage gets the same ownership
            assert torch.equal(_owner(cascade, stage).long(), owner.long())
        # The stage's head is its own whole; the other objectives' heads did not move.
        after = _state(cascade, stage)
        for other in OBJECTIVES:
            head = f"towers.0.user.heads.{other}.weight"
            assert torch.equal(after[head], before[head]) == (other != OBJECTIVES[index])
    # The mask frees a share of the shared elements, cascading: buy's share comes out of cart's.
    view_owner, cart_owner = _owner(cascade, "view"), _owner(cascade, "cart")
    assert int((view_owner == 1).sum()) > 0 and int((view_owner == 0).sum()) > 0
    # CPP: what each shared tensor frees holds at most `share` (0.3) of its |w|, and the next
    # smallest element would pass it.
    view, name = _state(cascade, "view"), "towers.0.user.bottom.net.0.weight"
    offset = sum(value.numel() for value in list(view.values())[: list(view).index(name)])
    weight = view[name].flatten().abs()
    freed = view_owner[offset : offset + len(weight)] == 1
    assert (
        float(weight[freed].sum())
        <= 0.3 * float(weight.sum())
        < float(weight[freed].sum() + weight[~freed].min())
    )
    assert ((cart_owner == 2) <= ((view_owner == 1) | (view_owner == 2))).all()
    # Recovery trained the kept elements only: the freed ones reach the next objective as trained.
    recovered, name = _state(cascade, "view_recovery"), "towers.0.user.bottom.net.0.weight"
    assert torch.equal(recovered[name].flatten()[freed], view[name].flatten()[freed])
    assert not torch.equal(recovered[name].flatten()[~freed], view[name].flatten()[~freed])


def _built(run_dir: Path, stage: str, weights: str):  # type: ignore[no-untyped-def]
    """Stage ``stage``'s model (its mask given that stage's ownership) with stage ``weights``'
    best weights, in evaluation mode, and its build."""
    loaded = load_recipe(run_dir / "recipe.yaml")
    recipe = next(entry for entry in loaded.stages if entry.name == stage).recipe
    built = build_run(recipe, recipe.seeds[0], "test", stage_contexts(loaded, run_dir)[stage])
    built.module.load_state_dict(
        load_checkpoint(run_dir / weights / "checkpoints" / "best.ckpt")["state_dict"]
    )
    return built.module.model.eval(), built


def test_later_stages_leave_the_earlier_objectives_bit_for_bit(cascade: Path) -> None:
    # An objective's function is fixed once its recovery stage ends: the next stage's model
    # holding the recovery stage's weights (what init_from starts it from).
    final, built = _built(cascade, "buy", "buy")
    trained = {stage: _built(cascade, stage, stage)[0] for stage in ("cart", "cart_recovery")} | {
        "buy": final
    }
    batch = next(iter(built.datamodule.loader("test")))
    own_queries = {}
    with torch.no_grad():
        items = final.item_vectors()
        scores = final.objective_vectors(batch) @ items.T
        fixed_at = (("view_recovery", ["cart", "cart_recovery", "buy"]), ("cart_recovery", ["buy"]))
        for k, (recovery, later) in enumerate(fixed_at):
            fixed = _built(cascade, later[0], recovery)[0]
            queries = fixed.objective_vectors(batch)
            own_queries[OBJECTIVES[k]] = queries[:, k]
            assert torch.equal(fixed.item_vectors(), items)  # the item side is the first's
            # Every later stage trained elements that this objective's forward reads as zero...
            for stage in later:
                assert torch.equal(trained[stage].objective_vectors(batch)[:, k], queries[:, k]), stage
            # ...so its scores in the final model are those of its recovery stage, bit for bit.
            assert torch.equal(scores[:, k], queries[:, k] @ items.T), recovery
        # The release (its freed elements read as zero) and the recovery are the changes an
        # earlier objective sees: its queries move at each, and never after.
        unreleased = _built(cascade, "view", "view")[0].objective_vectors(batch)[:, 0]
        released = _built(cascade, "view_recovery", "view")[0].objective_vectors(batch)[:, 0]
        assert not torch.equal(unreleased, released) and not torch.equal(released, own_queries["view"])
        # The last objective reads every element: its query is a plain run of the heads.
        plain = final.towers[0].user_vectors([batch[name] for name in final.lists])
        assert torch.equal(scores[:, 2], plain[:, 2] @ items.T)


def test_fusion_weights_rerank_at_serving_without_retraining(cascade: Path) -> None:
    loaded = load_recipe(cascade / "recipe.yaml")
    last = loaded.stages[-1]
    built = build_run(last.recipe, last.recipe.seeds[0], "test", stage_contexts(loaded, cascade)["buy"])
    state = load_checkpoint(cascade / "buy" / "checkpoints" / "best.ckpt")["state_dict"]
    built.module.load_state_dict(state)
    model = built.module.model.eval()
    batch = next(iter(built.datamodule.loader("test")))
    roles = built.datamodule.context()["roles"]
    results = []
    for fusion in ({"view": 1.0}, {"buy": 1.0}, {"view": 0.2, "cart": 0.3, "buy": 0.5}):
        evaluator = RetrievalEvaluator(["recall@50", "ndcg@50"], roles, fusion=fusion)
        with torch.no_grad():
            evaluator.update(model, batch)
            top = torch.topk(model.user_vectors(batch, fusion) @ model.item_vectors().T, 50).indices
        results.append((evaluator.compute(), top))
    # The weights change which items are retrieved, and the fused metrics with them...
    assert not torch.equal(results[0][1], results[1][1]) and not torch.equal(results[1][1], results[2][1])
    assert results[0][0]["ndcg@50:fused_view"] != results[2][0]["ndcg@50:fused_view"]
    # ...from the same trained weights: each objective's own ranking is unchanged.
    for name in ("ndcg@50:view", "ndcg@50:cart", "ndcg@50:buy"):
        assert results[0][0][name] == results[1][0][name] == results[2][0][name]
    assert all(torch.equal(value, state[name]) for name, value in built.module.state_dict().items())


def test_a_kill_in_the_last_stage_resumes_to_the_same_final_metrics(cascade: Path, tmp_path: Path) -> None:
    slow = ["stages.buy.train.checkpoint_every_n_steps=1", "stages.buy.train.max_epochs=3"]
    whole = train(RECIPE, [*TINY, *slow, f"logging.run_root={tmp_path / 'whole'}"])
    expected = json.loads((whole / "metrics.json").read_text())["test"]

    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rex.cli",
            "train",
            str(RECIPE),
            *TINY,
            *slow,
            f"logging.run_root={tmp_path / 'killed'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    deadline = time.time() + 500
    found: list[Path] = []
    while time.time() < deadline and not found and child.poll() is None:
        found = list((tmp_path / "killed").glob("csmf/*/buy/checkpoints/last.ckpt"))
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert found, "the run should have reached its last stage"
    run_dir = found[0].parents[2]
    assert not (run_dir / "metrics.json").exists()
    assert list(json.loads((run_dir / "stages.json").read_text())["stages"]) == ["view", "cart"]

    resumed = run_rex("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert set(got) >= {"recall@50:buy", "recall@200:cart", "ndcg@50:view"}


def test_retrieval_from_the_vector_index_ranks_as_the_exact_evaluation(cascade: Path, tmp_path: Path) -> None:
    """Every objective's queries and the fused ones search one index of the item vectors (`rex
    eval RUN --index PATH`). Refined over at least every item (refine_factor x k >= 11,953), the
    index returns the exact top items, so each metric must equal the exact evaluation's."""
    path, settings, rows = export_index(cascade, tmp_path / "items.lance", refine_factor=60)
    assert settings.kind == "ivf_pq" and rows == 11_953
    exact = evaluate(cascade)
    from_index = evaluate(cascade, index=path)  # what `rex eval RUN --index PATH` runs
    assert exact is not None and from_index is not None
    assert set(from_index) == set(exact)
    for objective in ("view", "cart", "buy"):
        assert f"recall@200:{objective}" in exact and f"recall@200:fused_{objective}" in exact
    assert sum(exact[name] for name in exact if name.startswith("recall@200")) > 0  # some hits to match
    for name, value in exact.items():
        assert from_index[name] == pytest.approx(value, abs=1e-6), name
