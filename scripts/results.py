"""The results tables: the multimodal CTR papers against DIN and din_mm, and the generative
retrievers (TIGER) against SASRec; 3 seeds each.

Every entry is a plain ``rex train RECIPE --seeds 3 [overrides]`` run. Selection is on
validation only (early stopping on validation AUC or NDCG@10; the best validation checkpoint is tested
once). Finished entries are kept and skipped, so the table can be filled across sessions:

    python scripts/results.py --jobs 2        # run what is missing, then write docs/results.md
    python scripts/results.py --only scientific_mm --dry-run
    python scripts/results.py --table-only    # rewrite docs/results.md from finished runs

Runs go to ``runs/results/<dataset>/<entry>/`` (git-ignored); the table to docs/results.md.
"""

from __future__ import annotations

import argparse
import json
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


@dataclass(frozen=True)
class Entry:
    dataset: str
    label: str
    role: str  # "paper", "ablation" or "baseline"
    recipe: str
    overrides: tuple[str, ...] = ()
    note: str = ""
    metrics: tuple[str, ...] = CTR

    @property
    def section(self) -> str:
        return self.dataset if self.metrics == CTR else f"{self.dataset}, generative retrieval"


ML100K_FIELDS = "model.use_fields=[user,item,age,gender,occupation,zip,release_year,genre]"
ENTRIES = [
    # Amazon Scientific (DecoRec): text and image vectors, one sampled negative per positive.
    Entry(
        "scientific_mm", "DIN", "baseline", "din.yaml", ("data.name=scientific_mm", "train.batch_size=256")
    ),
    Entry("scientific_mm", "din_mm", "baseline", "din_mm.yaml"),
    Entry("scientific_mm", "DMAE", "paper", "dmae.yaml"),
    Entry(
        "scientific_mm", "DMAE − MIEU (sim_bucket=null)", "ablation", "dmae.yaml", ("model.sim_bucket=null",)
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
    # Generative retrieval: TIGER (RQ-VAE semantic IDs, then constrained beam search) against
    # SASRec's full ranking, on the same leave-one-out split, history excluded on both sides.
    Entry(
        "scientific",
        "SASRec",
        "baseline",
        "sasrec.yaml",
        ("data.name=scientific", "data.max_len=20"),
        metrics=RANKING,
    ),
    Entry("scientific", "TIGER", "paper", "tiger.yaml", metrics=RANKING),
]


def folder(entry: Entry) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in entry.label.lower()).strip("-")
    return RUNS / entry.dataset / "-".join(filter(None, slug.split("-")))


def summary_file(entry: Entry) -> Path | None:
    found = sorted(folder(entry).glob("*/*/summary.json"))
    return found[-1] if found else None


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


def _cell(stats: dict[str, float] | None) -> str:
    return "—" if stats is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _wall_time(metrics_file: Path) -> float:
    """Training seconds of one seed's run; a staged run adds its stages' times."""
    stages = [
        metrics_file.parent / name / "metrics.json"
        for name in json.loads(metrics_file.read_text()).get("stages", {})
    ]
    files = [f for f in stages if f.is_file()] or [metrics_file]
    return sum(json.loads(f.read_text()).get("train", {}).get("wall_time_s", 0.0) for f in files)


def write_table(seeds: int) -> None:
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
        metrics = entries[0].metrics
        names = [{"auc": "AUC", "gauc": "gAUC"}.get(m, m) for m in metrics]
        lines += [
            f"## {section}",
            "",
            f"| model | role | {' | '.join(names)} | s / seed | command |",
            "|---|---|" + "---|" * len(metrics) + "---|---|",
        ]
        for entry in entries:
            path = summary_file(entry)
            summary = json.loads(path.read_text()) if path else {}
            test = summary.get("test", {})
            walls = [_wall_time(m) for m in (path.parent.glob("seed-*/metrics.json") if path else [])]
            wall = f"{sum(walls) / len(walls):.0f}" if walls else "—"
            command = f"`rex train recipes/{entry.recipe} {' '.join(entry.overrides)}`".replace(" `", "`")
            cells = [_cell(test.get(m)) for m in metrics]
            lines.append(f"| {entry.label} | {entry.role} | {' | '.join(cells)} | {wall} | {command} |")
        lines.append("")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    tmp = TABLE.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(TABLE)
    print(f"written {TABLE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="dataset(s) to run (default: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="entries run at once (1 torch thread each)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    parser.add_argument("--table-only", action="store_true", help="write docs/results.md only")
    args = parser.parse_args()
    if not args.table_only:
        todo = [e for e in ENTRIES if (not args.only or e.dataset in args.only) and not summary_file(e)]
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
