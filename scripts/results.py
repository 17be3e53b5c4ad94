"""The results tables: the multimodal CTR papers against DIN and din_mm, and the generative
retrievers (TIGER) against SASRec; 3 seeds each.

Every entry is a plain ``rex train RECIPE --seeds 3 [overrides]`` run. Selection is on
validation only (early stopping on validation AUC or NDCG@10; the best validation checkpoint is tested
once). Finished entries are kept and skipped, so the table can be filled across sessions:

    python scripts/results.py --jobs 2        # run what is missing, then write docs/results.md
    python scripts/results.py --only scientific_mm --dry-run
    python scripts/results.py --only scientific_mm --label Diff-MSIN   # rows by label prefix
    python scripts/results.py --table-only    # rewrite docs/results.md from finished runs
    python scripts/results.py --usd           # USD decoding on finished runs that lack it

Runs go to ``runs/results/<dataset>/<entry>/`` (git-ignored); the table to docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "results"
TABLE = REPO / "docs" / "results.md"
CTR = ("auc", "gauc", "logloss")
RANKING = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
# The embedding-collapse measure beside them, for the feature-interaction papers' rows.
CTR_ABUNDANCE = (*CTR, "abundance")
SCENARIOS = tuple(
    f"{metric}{scenario}"
    for scenario in ("", ":beauty", ":sports")
    for metric in ("auc", "gauc", "sparse_auc")
)


def objective_metrics(*objectives: str) -> tuple[str, ...]:
    """Recall@50, Recall@200 and NDCG@50 of each retrieval objective, in cascade order."""
    return tuple(
        f"{metric}:{objective}"
        for objective in objectives
        for metric in ("recall@50", "recall@200", "ndcg@50")
    )


OBJECTIVES = objective_metrics("view", "cart", "buy")


@dataclass(frozen=True)
class Entry:
    dataset: str
    label: str
    role: str  # "paper", "ablation" or "baseline"
    recipe: str
    overrides: tuple[str, ...] = ()
    note: str = ""
    metrics: tuple[str, ...] = CTR
    # A row read from one stage of another entry's runs (that entry's label), not run itself.
    stage: str = ""
    runs_of: str = ""
    # The section's heading where one dataset has two sections (``dataset`` then only names the folder).
    title: str = ""

    @property
    def section(self) -> str:
        if self.title:
            return self.title
        return self.dataset if "auc" in self.metrics else f"{self.dataset}, generative retrieval"


ML100K_FIELDS = "model.use_fields=[user,item,age,gender,occupation,zip,release_year,genre]"
# Taobao CTR rows read the user's view list (the row's own item dropped) as the history.
TAOBAO_VIEWS = (
    "data.name=taobao_mb",
    "model.use_fields=[user,item]",
    "data.user_columns=[history_view]",
    "model.history_key=history_view",
)
ENTRIES = [
    # Amazon Scientific (DecoRec): text and image vectors, one sampled negative per positive.
    Entry(
        "scientific_mm", "DIN", "baseline", "din.yaml", ("data.name=scientific_mm", "train.batch_size=256")
    ),
    Entry("scientific_mm", "din_mm", "baseline", "din_mm.yaml"),
    Entry("scientific_mm", "DMAE", "paper", "dmae.yaml"),
    Entry(
        "scientific_mm",
        "DMAE − similarity buckets (num_buckets=1)",
        "ablation",
        "dmae.yaml",
        ("model.sim_bucket.num_buckets=1",),
    ),
    Entry(
        "scientific_mm",
        "DMAE − auto-encoder constraint (decoder=false)",
        "ablation",
        "dmae.yaml",
        ("model.decoder=false",),
    ),
    Entry("scientific_mm", "Diff-MSIN", "paper", "diff_msin.yaml"),
    Entry(
        "scientific_mm",
        "Diff-MSIN − SRC (synergy=null)",
        "ablation",
        "diff_msin.yaml",
        ("model.synergy=null",),
    ),
    Entry("scientific_mm", "M3BSR (modalities)", "paper", "m3bsr_scientific.yaml"),
    Entry("scientific_mm", "M3BSR − denoiser", "ablation", "m3bsr_scientific.yaml", ("model.denoiser=null",)),
    # MMQ's semantic IDs as extra sparse features of DIN (the ranker stage reads them).
    Entry(
        "scientific_mm-din",
        "DIN + MMQ codes",
        "paper",
        "mmq_din.yaml",
        title="scientific_mm, MMQ codes in DIN",
    ),
    Entry(
        "scientific_mm-din",
        "DIN + MMQ codes − behaviour-aware fine-tuning (stage 1 only)",
        "ablation",
        "mmq_din.yaml",
        ("stages.finetune.export={}",),
        title="scientific_mm, MMQ codes in DIN",
    ),
    # MovieLens-100K: DIN gets the same user and item fields as DMGIN; din_mm adds MiniLM titles.
    Entry("ml-100k", "DIN", "baseline", "din.yaml", ("data.name=ml-100k", ML100K_FIELDS)),
    Entry(
        "ml-100k",
        "din_mm",
        "baseline",
        "din_mm.yaml",
        ("data.name=ml-100k", ML100K_FIELDS, "model.modalities=[text_minilm]"),
    ),
    Entry("ml-100k", "DMGIN", "paper", "dmgin.yaml"),
    Entry(
        "ml-100k",
        "DMGIN − inter-group (encoder.inter=null)",
        "ablation",
        "dmgin.yaml",
        ("model.encoder.inter=null",),
    ),
    # Taobao multi-behaviour: no modality vectors, so no din_mm.
    Entry("taobao_mb", "DIN", "baseline", "din.yaml", ("data.name=taobao_mb",)),
    Entry("taobao_mb", "M3BSR (behaviours)", "paper", "m3bsr.yaml"),
    Entry("taobao_mb", "M3BSR − denoiser", "ablation", "m3bsr.yaml", ("model.denoiser=null",)),
    # Feature interaction on Frappe (issue 14's baselines so far): the same fields, embedding
    # width, tower and batch; the models differ only in the interaction.
    Entry("frappe", "DeepFM", "baseline", "deepfm_frappe.yaml", metrics=CTR_ABUNDANCE),
    Entry("frappe", "DCN-V2", "baseline", "dcnv2.yaml", metrics=CTR_ABUNDANCE),
    Entry("frappe", "AutoInt+", "baseline", "autoint.yaml", metrics=CTR_ABUNDANCE),
    Entry("frappe", "Dual Enhanced Attention", "paper", "dea.yaml", metrics=CTR_ABUNDANCE),
    Entry(
        "frappe",
        "DEA − combo-ID (combo=false)",
        "ablation",
        "dea.yaml",
        ("model.interaction.combo=false",),
        metrics=CTR_ABUNDANCE,
    ),
    Entry(
        "frappe",
        "DEA − collapse filter (threshold=0)",
        "ablation",
        "dea.yaml",
        ("model.interaction.threshold=0",),
        metrics=CTR_ABUNDANCE,
    ),
    # DGenCTR (issue 13): two stages, diffusion pre-training then CTR fine-tuning; its ablation is
    # stage 2 alone, the same model from scratch.
    Entry("frappe", "DGenCTR", "paper", "dgenctr.yaml", metrics=CTR_ABUNDANCE),
    Entry(
        "frappe",
        "DGenCTR − pre-training (init_from=null)",
        "ablation",
        "dgenctr.yaml",
        ("stages.finetune.init_from=null",),
        metrics=CTR_ABUNDANCE,
    ),
    # The same models on MovieLens-100K and Taobao CTR: the Frappe recipes, given the
    # dataset's fields (no history).
    *(
        Entry(
            f"{name}-fi",
            label,
            role,
            recipe,
            (f"data.name={name}", fields, *overrides),
            metrics=CTR_ABUNDANCE,
            title=f"{name}, feature interaction",
        )
        for name, fields in (("ml-100k", ML100K_FIELDS), ("taobao_mb", "model.use_fields=[user,item]"))
        for label, role, recipe, overrides in [
            ("DeepFM", "baseline", "deepfm_frappe.yaml", ()),
            ("DCN-V2", "baseline", "dcnv2.yaml", ()),
            ("AutoInt+", "baseline", "autoint.yaml", ()),
            ("Dual Enhanced Attention", "paper", "dea.yaml", ()),
            ("DEA − combo-ID (combo=false)", "ablation", "dea.yaml", ("model.interaction.combo=false",)),
            (
                "DEA − collapse filter (threshold=0)",
                "ablation",
                "dea.yaml",
                ("model.interaction.threshold=0",),
            ),
            ("DGenCTR", "paper", "dgenctr.yaml", ()),
            (
                "DGenCTR − pre-training (init_from=null)",
                "ablation",
                "dgenctr.yaml",
                ("stages.finetune.init_from=null",),
            ),
        ]
    ),
    # LREA against full, truncated and hard-search target attention on the same long histories.
    Entry("ml-100k-long", "DIN, full history", "baseline", "din_long.yaml"),
    Entry("ml-100k-long", "DIN, last 50 items", "baseline", "din_long.yaml", ("data.max_len=50",)),
    Entry(
        "ml-100k-long",
        "SIM hard search (K-means group)",
        "baseline",
        "din_long.yaml",
        ("model.search._component_=search/item_group",),
    ),
    Entry("ml-100k-long", "LREA", "paper", "lrea.yaml"),
    Entry(
        "ml-100k-long", "LREA − low rank (rank 256)", "ablation", "lrea.yaml", ("model.interest.rank=256",)
    ),
    Entry("ml-100k-long", "LREA − non-negativity loss", "ablation", "lrea.yaml", ("losses.1.weight=0",)),
    # The same on Taobao's view lists (SIM's hard search needs item content to group by: none ships).
    *(
        Entry(
            "taobao_mb-long",
            label,
            role,
            recipe,
            (*TAOBAO_VIEWS, *overrides),
            title="taobao_mb, long view histories",
        )
        for label, role, recipe, overrides in [
            ("DIN, full history", "baseline", "din_long.yaml", ()),
            ("DIN, last 50 items", "baseline", "din_long.yaml", ("data.max_len=50",)),
            ("LREA", "paper", "lrea.yaml", ()),
            ("LREA − low rank (rank 256)", "ablation", "lrea.yaml", ("model.interest.rank=256",)),
            ("LREA − non-negativity loss", "ablation", "lrea.yaml", ("losses.1.weight=0",)),
        ]
    ),
    # Generative retrieval: TIGER (RQ-VAE semantic IDs, then constrained beam search) against
    # SASRec's full ranking, on the same leave-one-out split, history excluded on both sides.
    Entry(
        "scientific",
        "SASRec",
        "baseline",
        "sasrec.yaml",
        ("data.name=scientific", "data.max_len=20", "eval.exclude_history=true"),
        metrics=RANKING,
    ),
    Entry("scientific", "TIGER", "paper", "tiger.yaml", metrics=RANKING),
    # REG4Rec: MPQ tokens, reasoning paths, PARS + MSRA, CORP search; one key per ablation.
    *(
        Entry("scientific", label, role, "reg4rec.yaml", overrides, metrics=RANKING)
        for label, role, overrides in [
            ("REG4Rec", "paper", ()),
            ("REG4Rec − MPQ (one codebook)", "ablation", ("stages.tokenizer.model.quantizer.levels=1",)),
            ("REG4Rec − PARS/MSRA (paths=0)", "ablation", ("stages.reason.model.paths=0",)),
            (
                "REG4Rec − CORP (unconstrained beam)",
                "ablation",
                ("stages.reason.eval.evaluator.search.consistent=false",),
            ),
        ]
    ),
    # MMQ's semantic IDs against RQ-VAE's in the same TIGER recommender, on scientific_mm (text and
    # image vectors).
    *(
        Entry(
            "scientific_mm-tiger",
            label,
            role,
            recipe,
            overrides,
            metrics=RANKING,
            title="scientific_mm, MMQ in TIGER",
        )
        for label, role, recipe, overrides in [
            ("TIGER (RQ-VAE IDs over text)", "baseline", "tiger.yaml", ("data.name=scientific_mm",)),
            ("TIGER (MMQ IDs)", "paper", "mmq.yaml", ()),
            ("MMQ − orthogonal loss", "ablation", "mmq.yaml", ("stages.tokenizer.losses.3.weight=0",)),
            (
                "MMQ − behaviour-aware fine-tuning (stage 1 only)",
                "ablation",
                "mmq.yaml",
                ("stages.finetune.export={}",),
            ),
        ]
    ),
    # Beauty has no item text: TIGER's codes come from a SASRec stage's item embeddings, and
    # that stage is recipes/sasrec.yaml with histories of 20, tested on the same split.
    Entry(
        "beauty",
        "SASRec (the collaborative stage)",
        "baseline",
        "tiger_beauty.yaml",
        metrics=RANKING,
        stage="collaborative",
        runs_of="TIGER (collaborative IDs)",
    ),
    Entry("beauty", "TIGER (collaborative IDs)", "paper", "tiger_beauty.yaml", metrics=RANKING),
    Entry("beauty", "REG4Rec (collaborative MPQ tokens)", "paper", "reg4rec_beauty.yaml", metrics=RANKING),
    # HeterRec against the sequential baselines: each recipe's own settings (each fits 30 minutes
    # on the 2-core machine), histories of 50, the whole history masked (no target repeats).
    # Multi-scenario CTR: each backbone with and without GSVR (one key, model.gsvr).
    *(
        Entry(
            "amazon_multidomain",
            label,
            role,
            recipe,
            overrides,
            metrics=SCENARIOS,
            title="amazon_multidomain, multi-scenario",
        )
        for backbone, recipe in (
            ("shared-bottom", "shared_bottom.yaml"),
            ("MMoE", "mmoe.yaml"),
            ("PLE", "ple.yaml"),
            ("STAR", "star.yaml"),
        )
        for label, role, overrides in (
            (backbone, "baseline", ()),
            (f"{backbone} + GSVR", "paper", ("model.gsvr={_component_: variational/gsvr}",)),
        )
    ),
    # Multi-objective retrieval on taobao_mb: CSMF over the shared-bottom two tower, against it.
    *(
        Entry(
            "taobao_mb-retrieval",
            label,
            role,
            recipe,
            metrics=OBJECTIVES,
            title="taobao_mb, multi-objective retrieval",
        )
        for label, role, recipe in (
            ("separate towers", "baseline", "two_tower_separate.yaml"),
            ("shared-bottom two tower", "baseline", "two_tower_shared_bottom.yaml"),
            ("MMoE two tower", "baseline", "two_tower_mmoe.yaml"),
            ("CSMF (over shared-bottom)", "paper", "csmf_recovery.yaml"),
            ("CSMF − accuracy recovery", "ablation", "csmf.yaml"),
        )
    ),
    *(
        Entry(
            "tmall_mb-retrieval",
            label,
            role,
            recipe,
            metrics=objective_metrics("collect", "cart", "buy"),
            title="tmall_mb, multi-objective retrieval",
        )
        for label, role, recipe in (
            ("separate towers", "baseline", "two_tower_separate_tmall.yaml"),
            ("shared-bottom two tower", "baseline", "two_tower_shared_bottom_tmall.yaml"),
            ("MMoE two tower", "baseline", "two_tower_mmoe_tmall.yaml"),
            ("CSMF (over shared-bottom)", "paper", "csmf_recovery_tmall.yaml"),
            ("CSMF − accuracy recovery", "ablation", "csmf_tmall.yaml"),
        )
    ),
    *(
        Entry(
            f"{name}-heterrec",
            label,
            role,
            recipe,
            (f"data.name={name}", *overrides),
            metrics=RANKING,
            title=title,
        )
        for name, title in (
            ("beauty", "beauty, next item with attributes"),
            ("sports", "sports, next item with attributes"),
        )
        for label, role, recipe, overrides in (
            ("SASRec", "baseline", "sasrec.yaml", ()),
            ("SASRec + attributes", "baseline", "sasrec_attrs.yaml", ()),
            ("BERT4Rec", "baseline", "bert4rec.yaml", ()),
            ("GRU4Rec", "baseline", "gru4rec.yaml", ()),
            ("HeterRec", "paper", "heterrec.yaml", ()),
            (
                "HeterRec − listwise multi-step loss (steps=1)",
                "ablation",
                "heterrec.yaml",
                ("model.steps=1",),
            ),
            (
                "HeterRec − token-level attention (token_encoder=null)",
                "ablation",
                "heterrec.yaml",
                ("model.token_encoder=null",),
            ),
        )
    ),
]


@dataclass(frozen=True)
class DecodingSource:
    """A finished entry whose seeds are evaluated with and without USD (scripts/usd_eval.py)."""

    dataset: str  # as the table shows it
    model: str  # names the JSON files: runs/results/usd/<dataset>-<model>-<seed>.json
    entry_label: str  # the ENTRIES row whose runs are decoded
    stage: str = ""
    section: str = ""  # that row's ENTRIES dataset key, where it is not ``dataset``


USD = RUNS / "usd"
USD_SECTION = "USD decoding"
USD_METRICS = ("hit@3", "ndcg@3", "mrr@3", "hit@10", "ndcg@10", "mrr@10")
USD_SOURCES = [
    DecodingSource("scientific", "sasrec", "SASRec"),
    DecodingSource("beauty", "sasrec", "SASRec (the collaborative stage)", "collaborative"),
    DecodingSource("beauty", "tiger", "TIGER (collaborative IDs)", "recommender"),
    DecodingSource("sports", "sasrec", "SASRec", section="sports-heterrec"),
]


# What each generative section's rows mean, printed under its heading.
NOTES = {
    **{
        title: (
            f"Leave-one-out on Amazon {name} 5-core ({size}), histories of up to 50, full ranking "
            "over every item with the user's training history masked (no target repeats an item of "
            "it). Item attributes are the S3-Rec release's attribute ids (categories and brand): "
            "HeterRec flattens them into tokens, SASRec + attributes concatenates their mean embedding to "
            "the item's (then a linear map). Every row keeps its recipe's own settings (64 wide, Adam, batch "
            "256), each set so that a Beauty seed finishes within 30 minutes on the 2-core machine: "
            "SASRec and GRU4Rec up "
            "to 50 epochs, BERT4Rec 70, SASRec + attributes 44 and HeterRec 34 (each SASRec's 50-epoch "
            "wall time, measured side by side; GRU4Rec's 50 take less, but its validation peaks "
            "before them), with early stopping on "
            "validation NDCG@10 (BERT4Rec's patience is 15, since its cloze objective can sit at "
            f"popularity level for its first 8 epochs). None was tuned on test.{finding}"
        )
        for name, title, size, finding in (
            (
                "Beauty",
                "beauty, next item with attributes",
                "22,363 users, 12,101 items",
                " HeterRec is below SASRec here (test NDCG@10 0.0437 against 0.0562): its "
                "validation NDCG@10 peaks at 0.055-0.056 (epochs 15-19 of its 34, patience 3 then "
                "stops it), SASRec's at 0.067 (epochs 42-48). Neither HeterRec module helps here: "
                "with one prediction step (next item only) it reaches 0.0486 (validation peak "
                "0.060-0.062, epochs 14-17), and with item-level attention only (no token-level "
                "encoder) 0.0500 (peak 0.060-0.061, epochs 21-24); both are above GRU4Rec's 0.0467 "
                "and below SASRec. SASRec + attributes is below SASRec too (0.0526): at its 44-epoch "
                "cap its validation (0.065) was still rising slowly, but below SASRec's at the same "
                "epoch (0.066-0.067). BERT4Rec is the lowest row (0.0307): every seed ran all 70 "
                "epochs (best at the 59th to 70th, validation NDCG@10 0.040-0.042, still creeping "
                "up), after about 8 at popularity level. SASRec's s / seed mixes loads: its "
                "first seed ran beside heavier jobs (4,893 s); the GRU4Rec and steps=1 rows shared "
                "the cores with the test suite for about 25 minutes. HeterRec's rows here ran before "
                "8b07b38, when every item's attribute slots were embedded, not only the tokens "
                "present: the same function (a test checks the two against each other), but a "
                "training step 3 to 4 times slower on Sports, so their s / seed is the dense cost.",
            ),
            (
                "Sports",
                "sports, next item with attributes",
                "35,598 users, 18,357 items",
                " HeterRec is below SASRec here too (test NDCG@10 "
                "0.0235 against 0.0304): its validation NDCG@10 peaks at 0.028-0.030 at its 12th or "
                "13th epoch, and patience 3 stops it 3 epochs later, far inside its 34; SASRec's "
                "peaks at 0.036-0.038 at its 33rd to 42nd epoch, and patience 5 stops it 5 epochs "
                "later. As on Beauty, neither HeterRec module helps: with one prediction step (next "
                "item only) it reaches 0.0267 (validation peak 0.032-0.033, 12th or 13th epoch), and with "
                "item-level attention only (no token-level encoder) 0.0269 (the same peak, at the "
                "same epochs); both are below SASRec. SASRec + attributes is below SASRec as well "
                "(0.0285): its validation NDCG@10 peaks at 0.035-0.038, at its 22nd, 35th and 42nd "
                "epochs (patience 5 stopped two seeds early, the third reached the 44-epoch cap). "
                "Its epochs take about 80 s, its seeds 36 to 59 minutes. GRU4Rec (0.0243) is just "
                "above HeterRec. Its validation peaks later than on Beauty, near "
                "its 50-epoch cap: at 0.031-0.033, at its 42nd, 46th and 46th epochs, and "
                "two seeds ran all 50 (about 47 s an epoch, 39 to 46 minutes a seed). BERT4Rec is "
                "the lowest row, at about half SASRec's NDCG@10 as on Beauty (0.0159 against "
                "0.0304): its validation NDCG@10 stays at popularity level (about 0.007) for its "
                "first 9 to 11 epochs, then climbs to 0.020-0.021 at its 52nd, 56th and 62nd; two "
                "seeds ran all 70 epochs, and patience 15 stopped the third at 68. Its three seeds ran "
                "side by side, three one-thread jobs on the 2 cores (68-74 s an epoch, 79 to 82 "
                "minutes a seed); seeds 42 and 43 were killed in their 2nd epoch and resumed from the "
                "1st epoch's last.ckpt. Sports has "
                "1.6 times Beauty's users and 1.5 times its items, so a SASRec epoch with its "
                "validation takes about twice as long (67-72 s against 32.5 s): its seeds took 46 "
                "to 53 minutes each, one thread beside another job. HeterRec embeds only the tokens "
                "present (8b07b38): an epoch takes about 100 s, 68 s without token-level attention; "
                "its seeds 42 and 43 shared the cores with the test suite for 30 minutes (2,651 s "
                "against seed 44's 1,537 s). Each seed of the rows after SASRec ran as a one-seed run "
                "(`seed=N --seeds 1`), two at a time (BERT4Rec's three), moved into one run folder "
                "per row; so did SASRec's seed 44, beside its seeds 42 and 43.",
            ),
        )
    },
    USD_SECTION: (
        "Uncertainty-aware Semantic Decoding (arXiv:2508.07210) applied at test time to the trained "
        "runs of the generative sections above (same checkpoints, split and whole-history mask) "
        "and, on Sports, to SASRec's runs of its next-item section (histories of up to 50). "
        "Its settings are chosen per seed on validation NDCG@10 from a small grid (K-means groups "
        "256 or 1,024 of the output item table, mix 0, 0.2 or 0.5 toward the group mean, entropy "
        "weight -1, 0 or 1; TIGER's beam search, slow on CPU: 64 groups, mix 0 or 0.2, weight 1), "
        "then tested once with and once without. The paper's metrics are @3. On Scientific and "
        "Beauty USD does not help: on SASRec the best grid point gains 0.0001-0.0017 validation NDCG@10 and nothing "
        "on test (means within 0.0001 at every metric); on TIGER every grid point is below plain "
        "decoding on validation (by 0.004-0.006) and it costs 0.0024 test NDCG@10. On Sports it "
        "helps SASRec slightly: 0.0005-0.0009 validation NDCG@10, and on test 0.0002-0.0006 "
        "NDCG@10 and 0.0005-0.0014 hit@10 in every seed (paired), within one standard deviation "
        "of the seeds' spread. A grid point costs about a minute on one thread there (two "
        "float64 softmaxes over 35,598 users by 18,357 items). "
        "`python scripts/results.py --usd` evaluates the finished seeds that lack a result."
    ),
    "scientific_mm": (
        "Amazon Scientific (DecoRec), CTR: each next item plus one sampled negative, the history is "
        "the user's earlier items (up to 50, every row). M3BSR here is its modality-denoising half only (text and image histories denoised "
        "given the ID history); its behaviour half is the taobao_mb row."
    ),
    "taobao_mb": (
        "Taobao view/cart/buy, CTR with buy as the label, every split a buy against an item the user "
        "never touched, lists of up to 20. M3BSR here is its behaviour-denoising half only (view "
        "denoised given cart and buy). A combined multimodal × multi-behaviour run needs one dataset "
        "with both item content vectors and several behaviour types per user; no shipped dataset "
        "has both (taobao_mb has no item content, scientific_mm one behaviour)."
    ),
    "frappe": (
        "Frappe app-usage CTR (the 86,582 rows of the NFM release, split 8:1:1 at random with seed "
        "2024, 10 fields). Every row "
        "has embedding 10, an MLP tower 400-400-400 with batch norm and dropout 0.2, Adam 1e-3 and "
        "batch 4,096, and adds one interaction's logit to the tower's: FM (DeepFM, which also has its "
        "first-order term), a 3-layer cross network (DCN-V2, parallel) or 3 interacting "
        "self-attention layers (AutoInt+), or Dual Enhanced Attention's 2 layers of combo-ID and "
        "collapse-avoiding attention (2 heads of 16). None was tuned. abundance is the mean "
        "information abundance of the 10 field embedding matrices (sum of singular values over the "
        "largest; 10 at most, the embedding width), the paper's embedding-collapse measure. DEA "
        "leads on AUC, but its field embeddings are no less collapsed than the baselines' (lower "
        "abundance), and its collapse filter is nearly idle: at threshold 0.5/F it drops 0.3-3.4 % "
        "of the trained models' attention weights (`python scripts/dea_filter_share.py SEED_DIR`), "
        "so the ablation without it is within noise. DGenCTR is no tower plus interaction: a "
        "2-layer, 32-wide bidirectional transformer over the 10 field tokens and the label token, "
        "pre-trained by masked discrete diffusion (30 epochs) and fine-tuned on the masked label "
        "(its abundance is out of 32); its ablation is the same model trained from scratch."
    ),
    "ml-100k, feature interaction": (
        "MovieLens-100K CTR (rating >= 4 is a click), the split of the ml-100k section, 8 fields "
        "(user, item, age, gender, occupation, zip, release year, genres), no history. The Frappe "
        "section's recipes unchanged but for the data and fields: embedding 10, the same tower, "
        "interactions, optimiser and batch. None was tuned; abundance as above (10 at most). "
        "Here DEA does not beat the baselines on AUC (it has the best gAUC, by 0.003, and the "
        "worst logloss), and its collapse filter drops none of the trained models' attention "
        "weights (0.00 % on test batches), so that ablation row is the same model in effect."
    ),
    "taobao_mb, feature interaction": (
        "Taobao CTR, the split of the taobao_mb section (a buy against an item the user never "
        "touched), with the two fields it has: user and item (no item attributes ship with it), "
        "no history. The Frappe section's recipes unchanged but for the data and fields. With two "
        "fields there is one pair to interact: FM is a user-item dot product, and DEA's combo-ID "
        "embedding of the (user, item) pair is learnt from training pairs, which 10 of the 30,898 "
        "test rows repeat. None was tuned; abundance 10 at most. DEA does not beat the baselines "
        "here (AUC 0.6142 against DeepFM's 0.6218, within about one std of each other), and "
        "neither ablation costs it anything: with one pair, there is little to interact. DGenCTR "
        "is the best row (AUC 0.6290, 0.0072 above DeepFM), and its diffusion pre-training adds "
        "0.0047 AUC over the same backbone from scratch, about one std."
    ),
    "ml-100k-long": (
        "MovieLens-100K CTR (rating >= 4 is a click) with each row's history: the user's movies rated "
        "before it, up to 256 (median 69, 90th percentile 233). Every row has the same 8 fields, "
        "embedding 16, a Dice MLP tower 200-80, Adam 1e-3 and batch 1,024, and differs only in how "
        "the target reads the history: DIN's MLP attention over all of it, over the last 50 items, "
        "or over the items in the target's K-means group of item-text vectors (SIM's hard search); "
        "or LREA's attention over 16 learnt mixtures of it. None was tuned. LREA's AUC is 0.0009 "
        "below DIN's over the full history (the issue's bar: within 0.005) and level with SIM's, "
        "in about a tenth of DIN's training time; DIN over only the last 50 items is the best row, "
        "so long histories add nothing here that LREA could keep. Serving cost "
        "(`benchmarks/lrea.py`, one thread): at 10,000 items LREA's absorbed path costs 0.22 µs "
        "per candidate, against 43 ms with DIN's attention and 82 µs with dot-product attention. "
        "The full-history and SIM rows ran while up to six other jobs shared the two cores, so "
        "their times are inflated."
    ),
    "taobao_mb, long view histories": (
        "Taobao CTR, the split of the taobao_mb section, with the user's view list as the history "
        "(the row's own item dropped: every negative is an item the user never touched, so its "
        "presence would give the label away), up to 256 items (median 47, 90th percentile 108, "
        "99th 209, longest 1,577). Taobao has no timestamps and its lists are in item-id order, so "
        "the last 50 are an arbitrary 50, not the most recent. The ml-100k-long section's recipes "
        "on the user and item fields; no SIM row, since Taobao ships no item content or category "
        "to group by. None was tuned. Here the long history helps: DIN over all of it beats "
        "DIN over 50 items (AUC 0.6391 against 0.6363), and LREA keeps that gain (0.6398, the "
        "issue's bar is within 0.005 of full DIN), training in 48 s a seed (DIN's 681 s ran under "
        "more load, so that ratio overstates LREA's gain; benchmarks/lrea.py measures speed); "
        "by gAUC the three are within about two stds, DIN over 50 items highest (0.6367). "
        "Neither ablation costs LREA anything: rank 256 (full rank at this length) is level "
        "(0.6409) at 11 times the time, and so is dropping the non-negativity loss (0.6396). "
        "The LREA rows ran as two jobs on the two cores; the DIN rows shared them with one or "
        "two other jobs."
    ),
    "amazon_multidomain, multi-scenario": (
        "Amazon Beauty and Sports (5-core) as two scenarios of one CTR task: a row per position "
        "of a user's sequence in one domain with one sampled negative from that domain, the "
        "history the user's earlier items there. Every backbone reads the same inputs (item and "
        "scenario embeddings and DIN's target attention over the history, "
        "recipes/base/multi_scenario.yaml); + GSVR is the same recipe with model.gsvr set, which "
        "adds a Gaussian per (user or item, scenario) under a cluster prior and its KL term "
        "(recipes/gsvr.yaml). sparse_auc is the AUC over rows whose user has at most 5 earlier "
        "interactions in the row's scenario. None was tuned. Every backbone peaks on validation "
        "at its 3rd to 5th epoch (STAR's the earliest) and then overfits (patience 2 keeps the "
        "best); with GSVR the peak is lower and comes one or two epochs earlier (STAR + GSVR's at "
        "the 2nd): its per-(user, scenario) Gaussians add free parameters that fit the training "
        "rows, and the KL weight (0.05) was not tuned. GSVR lowers every backbone's AUC, STAR's "
        "least (0.0064). A validation-only check (sweeps/gsvr_kl.yaml, shared-bottom + GSVR, "
        "seed 42, KL weight 0.005, 0.05, 0.5 or 2.0) does not change that: the best, 2.0, reaches "
        "validation AUC 0.7597 (0.05: 0.7532), against 0.7706 for shared-bottom alone."
    ),
    "taobao_mb, multi-objective retrieval": (
        "Taobao view, cart and buy as three retrieval objectives: per user and objective, the "
        "file's test item of that behaviour is the test target and one seeded training item the "
        "validation target; full retrieval over all 11,953 items, the user's known items of that "
        "behaviour excluded. The user tower mean-pools the user's training views, carts and buys; "
        "the item tower embeds the item; sampled softmax over 2,048 items. Parameters: separate "
        "towers 2,579,328, shared-bottom and CSMF 876,288, MMoE 1,203,596 "
        "(`benchmarks/two_tower.py`, which also times the user tower). CSMF trains the "
        "shared-bottom model in cascade (view, cart, buy), each stage on the parameter elements "
        "its objective owns, with the paper's accuracy recovery: after view's and cart's "
        "releases, a stage fine-tunes the elements the objective kept. Every model runs up to 15 "
        "epochs with patience 2 on validation NDCG@50 (CSMF's stages up to 15, 20 and 10, its "
        "recovery stages up to 5; the same caps as Tmall's), each run within 30 minutes on one thread. The "
        "separate towers peak at their 6th-7th epoch and stop (each objective's towers see only "
        "its own rows, and buy has few); shared-bottom is still rising at the cap (+0.002 "
        "recall@50 in its 15th epoch), as are two of MMoE's three seeds, which spread widely. An "
        "earlier cap of 4 epochs stopped every model while it was climbing steeply "
        "(shared-bottom's recall@50 on view was 0.1037 there, against 0.1540 here). CSMF does not "
        "beat its baselines here: it is below shared-bottom, the same network trained on all "
        "three objectives at once, on every objective (recall@50 view 0.1465 against 0.1540, "
        "cart 0.2144 against 0.2200, buy 0.1803 against 0.1838), and well below MMoE (0.1744, "
        "0.2546, 0.2294), though above the separate towers on every objective with a third of "
        "their parameters. Accuracy recovery is what CSMF's cascade needs: without it (the "
        "ablation row) recall@50 falls by 0.009 on each objective (0.1377, 0.2059, 0.1716), "
        "1.4 to 3.1 times the larger of the two rows' standard deviations. CSMF's view stage, which alone trains the item side, "
        "ends at or next to its 15-epoch cap in every seed (best at the 14th or 15th), as "
        "shared-bottom does; cart's stage stops on patience after 11 to 15 of its 20 epochs, and "
        "the 5-epoch recovery stages gain under 0.001 validation NDCG@50 in their last epoch. "
        "None was tuned. The two baselines' first seeds "
        "shared the cores with the test suite, so their s / seed is inflated."
    ),
    "tmall_mb, multi-objective retrieval": (
        "Tmall collect, cart and buy as three retrieval objectives (CSMF's cascade: collect, cart, "
        "buy). Buy's targets are the file's valid and test buys, each its own row (up to 25 per "
        "user); collect and cart hold out one seeded item per user for test and another for "
        "validation (`rex data info tmall_mb`). Cart is small (426 test users), so its rows are "
        "noisy. Same models, item count and epoch caps as Taobao's, so the same parameter counts; "
        "the baselines run up to 15 epochs, CSMF stages up to 15, 20 and 10, and CSMF's two "
        "accuracy-recovery stages (after collect's and cart's releases) up to 5 each. CSMF's later stages train only their objective's user "
        "heads over item vectors frozen after the first stage (collect's, our reading), which "
        "costs buy most here. Accuracy recovery does not close the gap: against the same "
        "cascade without it, recall@50 moves by -0.0027 on collect, +0.0062 on cart and +0.0001 "
        "on buy, each within about 1.5 standard deviations. None was tuned."
    ),
    "scientific, generative retrieval": (
        "Leave-one-out on Amazon Scientific (8,442 users, 4,385 items), histories of up to 20 "
        "items, selection on validation NDCG@10. Both sides exclude the user's whole training "
        "history from the ranking (`eval.exclude_history: true`, chosen explicitly: SASRec masks it "
        "in its full ranking over every item; TIGER excludes it inside its beam search of 20), "
        "while each model reads only its 20-item window. 50 of the 8,442 test targets repeat an "
        "item of their history, so both sides miss them by construction. TIGER's codes: an RQ-VAE "
        "over MiniLM vectors of each item's title, categories and brand. Test re-run with the "
        "whole-history mask (`rex eval RUN --record`); the checkpoints were selected under the "
        "earlier window-only mask. REG4Rec (recipes/reg4rec.yaml, not tuned) is well below TIGER "
        "and SASRec, and none of its modules helps here: each one-key ablation is within a "
        "standard deviation of it or above. Its recommender stage runs 8 epochs (TIGER's up to "
        "20); validation NDCG@10 flattens from the 6th, and one seed peaked at the 5th. Its MPQ "
        "tokens collide far more than RQ-VAE's (57% of items share their whole token set with "
        "another, against 12%); quantizer/parallel's split_latent halves that but lowered "
        "validation NDCG@10 (0.034 to 0.027, one seed)."
    ),
    "scientific_mm, MMQ codes in DIN": (
        "The scientific_mm section's split and protocol (its DIN and din_mm rows are the "
        "baselines): DIN at din.yaml's sizes where every item (target and history) also has one "
        "embedding per MMQ semantic-ID level, the IDs from recipes/mmq_din.yaml's tokenizer stages. "
        "The codes add 0.030 AUC over DIN (0.7546 against 0.7249), all of it from the "
        "behaviour-aware fine-tuning: stage 1's codes alone leave DIN where it was (0.7248). "
        "They do not reach din_mm (0.7928), which reads the text and image vectors themselves. "
        "Both rows ran beside one or two other jobs on the two cores, so their times are inflated."
    ),
    "scientific_mm, MMQ in TIGER": (
        "Leave-one-out on scientific_mm's sequences, histories of up to 20, the whole history "
        "excluded, TIGER's recommender stage unchanged (2+2 layers, 64 wide, beam 20): only the "
        "semantic IDs differ. RQ-VAE's come from the item-text vectors alone (recipes/tiger.yaml); "
        "MMQ's from the text and image vectors through shared and modality-specific experts, "
        "then fine-tuned on next-item co-occurrence (recipes/mmq.yaml). None was tuned. MMQ's IDs "
        "beat RQ-VAE's (test NDCG@10 0.0646 against 0.0550, 3.4 times the larger standard "
        "deviation), and all of the gain comes from the behaviour-aware fine-tuning: stage 1's "
        "codes alone, from the same tokenizer runs, give 0.0538, RQ-VAE's level, so the two "
        "modalities' shared-specific experts add nothing on their own. Without the orthogonality "
        "loss MMQ loses 0.0027 (0.0619, 2.5 times the larger standard deviation) and keeps most "
        "of its gain. Fine-tuning doubles the items that share all "
        "three codes with another (10-12% against 4-6% after stage 1, and 4-5% for RQ-VAE). Every "
        "row's recommender peaks at its 17th to 20th epoch of 20 (TIGER's cap), its last three "
        "within 0.0015 of each other on validation. The rows ran as two jobs on the two cores."
    ),
    "beauty, generative retrieval": (
        "Leave-one-out on Amazon Beauty, 5-core (22,363 users, 12,101 items), histories of up to 20 "
        "items, the whole history excluded as above (Beauty has no repeated targets, so masking is "
        "its default). The SASRec row is the test result of TIGER's first stage, which is "
        "`recipes/sasrec.yaml` at `data.max_len=20`, so both rows share the split, seed and "
        "protocol. The TIGER paper reports Recall@10 0.0648 and NDCG@10 0.0384 on Beauty. Its "
        "protocol differs: codes from Sentence-T5 vectors of item text and metadata (rex's Beauty "
        "has no item text, so its codes are collaborative: an RQ-VAE over the SASRec stage's item "
        "embeddings), a 4+4-layer, 128-wide T5 (rex: 2+2 layers, 64 wide, a 2-core CPU budget), "
        "and no history exclusion stated. Test re-run with the whole-history mask as above. "
        "REG4Rec (recipes/reg4rec_beauty.yaml, not tuned) has the same first stage (its test "
        "NDCG@10 0.0539 ± 0.0007, SASRec's level), MPQ over its item vectors (collision rate "
        "0.7-1.0%) and a 20-epoch recommender, as TIGER's, then the 5-epoch reason stage. It is far "
        "below both: NDCG@10 0.0191 against TIGER's 0.0334. The recommender peaks on validation at "
        "its 17th to 19th epoch (0.026-0.030) and tests at 0.0198 ± 0.0012 before the reason "
        "stage; the PARS/MSRA stage lowers validation on every seed (its best 0.025-0.028), and patience 2 "
        "stops it at its 3rd or 4th epoch. Its s / seed sums the four stages, run as three one-seed "
        "jobs on the two cores (the first two beside the test suite for half an hour) and resumed "
        "once after a stop, which ran one recommender epoch of seed 42 twice."
    ),
}


def folder(entry: Entry) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in (entry.runs_of or entry.label).lower()).strip("-")
    return RUNS / entry.dataset / "-".join(filter(None, slug.split("-")))


def seed_metrics(entry: Entry) -> list[Path]:
    """The finished seeds' metrics.json (the stage's own for a stage row) of the latest run."""
    runs = sorted(folder(entry).glob("*/*/seed-*/metrics.json"))
    if not runs:
        return []
    latest = runs[-1].parent.parent
    files = [
        f.parent / entry.stage / "metrics.json" if entry.stage else f
        for f in latest.glob("seed-*/metrics.json")
    ]
    return sorted(f for f in files if f.is_file() and "test" in json.loads(f.read_text()))


def summary_file(entry: Entry) -> Path | None:
    found = sorted(folder(entry).glob("*/*/summary.json"))
    return found[-1] if found else None


def usd_file(source: DecodingSource, seed_dir: Path) -> Path:
    return USD / f"{source.dataset}-{source.model}-{seed_dir.name.removeprefix('seed-')}.json"


def usd_seed_dirs(source: DecodingSource) -> list[Path]:
    """The seed folders of the source entry's latest finished run."""
    dataset = source.section or source.dataset
    entry = next(e for e in ENTRIES if e.dataset == dataset and e.label == source.entry_label)
    return [f.parent.parent if entry.stage else f.parent for f in seed_metrics(entry)]


def run_usd() -> list[str]:
    """scripts/usd_eval.py on every finished seed that has no USD result yet; failures."""
    failed = []
    for source in USD_SOURCES:
        for seed_dir in usd_seed_dirs(source):
            out = usd_file(source, seed_dir)
            if out.is_file():
                continue
            args = [sys.executable, str(REPO / "scripts" / "usd_eval.py"), str(seed_dir)]
            args += [source.stage, str(out)] if source.stage else [str(out)]
            print(f"[usd] {' '.join(args[1:])}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.with_suffix(".log"), "wb") as log:
                if subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode:
                    failed.append(f"usd: {out.name}")
    return failed


def seed_count(found: int, seeds: int) -> str:
    """The label suffix of a row with some but not all of its seeds, such as " (2 seeds)"."""
    return f" ({found} seed{'s' * (found > 1)})" if found and found != seeds else ""


def usd_lines(seeds: int, published: str) -> list[str]:
    """The USD section: each source's test metrics without and with the decoding; a source
    with no results here keeps its ``published`` rows."""
    old_rows = _rows(published, key_cells=3)
    lines = [f"## {USD_SECTION}", "", NOTES[USD_SECTION], ""]
    lines += [
        f"| dataset | model | decoding | {' | '.join(USD_METRICS)} | settings chosen | command |",
        "|---|---|---|" + "---|" * len(USD_METRICS) + "---|---|",
    ]
    for source in USD_SOURCES:
        results = [
            json.loads(f.read_text()) for f in sorted(USD.glob(f"{source.dataset}-{source.model}-*.json"))
        ]
        short = seed_count(len(results), seeds)
        chosen = "; ".join(
            "k {k}, mix {mix}, weight {weight}".format(
                k=r["chosen"]["cluster"]["k"], mix=r["chosen"]["mix"], weight=r["chosen"]["entropy_weight"]
            )
            for r in results
        )
        stage = f" {source.stage}" if source.stage else ""
        command = f"`python scripts/usd_eval.py SEED_DIR{stage} OUT.json`"
        for side, name in (("test_plain", "plain"), ("test_usd", "USD")):
            kept = old_rows.get(f"{source.dataset} | {source.entry_label} | {name}")
            if not results and kept:
                lines.append(kept)  # run elsewhere; kept as published
                continue
            cells = [_cell([r[side][m] for r in results]) for m in USD_METRICS]
            settings = (chosen or "—") if side == "test_usd" else ""
            lines.append(
                f"| {source.dataset} | {source.entry_label}{short} | {name} | {' | '.join(cells)} "
                f"| {settings} | {command} |"
            )
    return [*lines, ""]


def command(entry: Entry, seeds: int, threads: int | None) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "rex"),
        "train",
        f"recipes/{entry.recipe}",
        "--seeds",
        str(seeds),
        *entry.overrides,
        *([f"train.num_threads={threads}"] if threads else []),
        f"logging.run_root={folder(entry)}",
        "logging.progress_bar=false",
    ]


def run_all(entries: list[Entry], seeds: int, jobs: int) -> list[str]:
    """Run the entries, ``jobs`` at a time (one torch thread each when jobs > 1); failures."""
    threads = 1 if jobs > 1 else None
    pending = list(entries)
    running: list[tuple[Entry, subprocess.Popen[bytes]]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            entry = pending.pop(0)
            args = command(entry, seeds, threads)
            print(f"[{entry.dataset}] {entry.label}: {' '.join(args[1:])}", flush=True)
            log = folder(entry).with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as out:
                running.append(
                    (entry, subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
                )
        time.sleep(5)
        for entry, process in list(running):
            if process.poll() is not None:
                running.remove((entry, process))
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(f"[{entry.dataset}] {entry.label}: {status}, log {folder(entry).with_suffix('.log')}")
                if process.returncode != 0:
                    failed.append(f"{entry.dataset}: {entry.label}")
    return failed


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _wall_time(metrics_file: Path) -> float:
    """Training seconds of one seed's run; a staged run adds its stages' times."""
    stages = [
        metrics_file.parent / name / "metrics.json"
        for name in json.loads(metrics_file.read_text()).get("stages", {})
    ]
    files = [f for f in stages if f.is_file()] or [metrics_file]
    return sum(_fit_seconds(json.loads(f.read_text())) for f in files)


def _fit_seconds(metrics: dict) -> float:
    """The fit's wall time; for a resumed run, the validation clock, which carries over the
    resume, where ``wall_time_s`` counts only the part after it."""
    validated = metrics.get("validation") or [{}]
    return max(metrics.get("train", {}).get("wall_time_s", 0.0), validated[-1].get("elapsed_s", 0.0))


def _sections(text: str) -> dict[str, str]:
    """The ``## section`` blocks of the current table, by title."""
    blocks = text.split("\n## ")[1:]
    return {block.split("\n", 1)[0]: "## " + block.rstrip("\n") + "\n" for block in blocks}


SEED_COUNT = re.compile(r" \(\d+ seeds?\)$")


def _rows(section: str, key_cells: int = 1) -> dict[str, str]:
    """A section's table rows by their first ``key_cells`` cells (the model label; dataset,
    model and decoding for USD), a published row's seed count left out of the key."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| model ", "| dataset ")):
            cells = [SEED_COUNT.sub("", cell.strip()) for cell in line.split("|")[1 : 1 + key_cells]]
            rows[" | ".join(cells)] = line
    return rows


def write_table(seeds: int) -> None:
    """docs/results.md from the finished runs; a row with no runs here keeps its published line."""
    kept = _sections(TABLE.read_text()) if TABLE.is_file() else {}
    lines = [
        "# Results",
        "",
        "Generated by `python scripts/results.py`. Test metrics of the best validation checkpoint,",
        f"mean ± std over {seeds} seeds (42, 43, 44). Hyperparameters are the recipes' own, fixed",
        "before any test run; early stopping and checkpoint selection use validation AUC (CTR)",
        "or validation NDCG@10 (generative retrieval) only.",
        "`s / seed` is one seed's training time, averaged, on the 2-core CPU machine with two",
        "entries at once (`--jobs 2`, one torch thread each). — means not run yet.",
        "",
    ]
    for section in dict.fromkeys(e.section for e in ENTRIES):
        entries = [e for e in ENTRIES if e.section == section]
        runs = {e.label: seed_metrics(e) for e in entries}
        metrics = tuple(dict.fromkeys(m for e in entries for m in e.metrics))  # every column any row has
        names = [{"auc": "AUC", "gauc": "gAUC"}.get(m, m) for m in metrics]
        lines += [f"## {section}", ""]
        if section in NOTES:
            lines += [NOTES[section], ""]
        lines += [
            f"| model | role | {' | '.join(names)} | s / seed | command |",
            "|---|---|" + "---|" * len(metrics) + "---|---|",
        ]
        old_rows = _rows(kept.get(section, ""))
        for entry in entries:
            if not runs[entry.label] and entry.label in old_rows:
                lines.append(old_rows[entry.label])  # run elsewhere; kept as published
                continue
            tests = [json.loads(f.read_text())["test"] for f in runs[entry.label]]
            walls = [_wall_time(f) for f in runs[entry.label]]
            wall = f"{sum(walls) / len(walls):.0f}" if walls else "—"
            command = f"`rex train recipes/{entry.recipe} {' '.join(entry.overrides)}`".replace(" `", "`")
            if entry.stage:
                command += f", stage {entry.stage}"
            cells = [_cell([t[m] for t in tests if m in t]) for m in metrics]
            short = seed_count(len(tests), seeds)
            lines.append(
                f"| {entry.label}{short} | {entry.role} | {' | '.join(cells)} | {wall} | {command} |"
            )
        lines.append("")
    lines += usd_lines(seeds, kept.get(USD_SECTION, ""))
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    tmp = TABLE.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(TABLE)
    print(f"written {TABLE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="dataset(s) to run (default: all)")
    parser.add_argument("--label", action="append", help="rows whose label starts with this (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="entries run at once (1 torch thread each)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    parser.add_argument("--table-only", action="store_true", help="write docs/results.md only")
    parser.add_argument(
        "--usd",
        action="store_true",
        help="only evaluate USD on finished runs that lack it, then write the table",
    )
    args = parser.parse_args()
    if args.usd:
        failed = run_usd()
        if failed:
            print(f"failed: {'; '.join(failed)}", file=sys.stderr)
    elif not args.table_only:
        todo = [
            e
            for e in ENTRIES
            if (not args.only or e.dataset in args.only)
            and (not args.label or any(e.label.startswith(label) for label in args.label))
            and not e.runs_of
            and not summary_file(e)
        ]
        if args.dry_run:
            for entry in todo:
                print(
                    f"would run [{entry.dataset}] {entry.label}: {' '.join(command(entry, args.seeds, None)[1:])}"
                )
            return
        failed = run_all(todo, args.seeds, args.jobs)
        if failed:
            print(f"failed: {'; '.join(failed)}", file=sys.stderr)
    write_table(args.seeds)


if __name__ == "__main__":
    main()
