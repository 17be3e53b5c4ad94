"""rex against RecBole (sequential models on Beauty, data preparation) and a CTR peer (DeepFM on Frappe).

Every measurement is a fresh process in its framework's own venv (``install.sh`` makes the
peers'), alternating rex and the peer (A B A B), or, for the budget runs, both at once, so
drifting machine load hits both alike.
Medians over the repeats are reported with the rex/peer ratio. Throughput workers warm up
before they time anything.

    python benchmarks/peers/run.py              # the table in benchmarks/results/peers.{md,json}
    python benchmarks/peers/run.py --quick      # a smoke run: 1 repeat, few batches, 60 s budgets

Sections: ``prep`` (raw file -> first training batch, Beauty and ml-1m), ``sasrec``
(throughput, full-ranking evaluation), ``budget`` (SASRec, BERT4Rec and GRU4Rec on Beauty with
the same hyperparameters and wall-clock budget on both sides: best validation and test
NDCG@10, time to RecBole's budget-end validation NDCG@10) and ``deepfm`` (training and
evaluation rows/s, peak RSS, test AUC). ``--only`` picks some.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = REPO / "benchmarks" / ".peers"
RESULTS = REPO / "benchmarks" / "results"
LOGS = PEERS / "logs"
PYTHON = {
    "rex": REPO / ".venv" / "bin" / "python",
    "recbole": PEERS / "recbole" / "bin" / "python",
    "rechub": PEERS / "rechub" / "bin" / "python",
}
# DeepFM's peer is torch-rechub: FuxiCTR's PyPI package ships no models (they live in its
# GitHub model_zoo), see install_ctr_peer.sh.
CTR_PEER = "rechub"
Result = dict[str, Any]


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", flush=True)


def worker(framework: str, script: str, task: str, *args: str, threads: int) -> Result:
    """Run one measurement process; its output goes to a log file, its result comes back."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".json", dir=PEERS, delete=False) as handle:
        out = Path(handle.name)
    stem = f"{framework}-{task}-{'-'.join(a.strip('-') for a in args) or 'default'}"
    log_file = LOGS / f"{stem}.log"
    command = [
        str(PYTHON[framework]),
        str(HERE / script),
        "--task",
        task,
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    started = time.perf_counter()
    with log_file.open("w") as handle:
        # RecBole writes log_tensorboard/ into its working directory: keep it under .peers.
        cwd = REPO if framework == "rex" else PEERS
        code = subprocess.call([*command, *args], stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise SystemExit(f"{framework} {task} failed (exit {code}); log {log_file}:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    log(f"{framework:8s} {task} {' '.join(args)}: {time.perf_counter() - started:.0f} s")
    return result


def alternate(calls: dict[str, Callable[[], Result]], repeats: int) -> dict[str, list[Result]]:
    """A B A B ...: each call ``repeats`` times, interleaved."""
    results: dict[str, list[Result]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            results[name].append(call())
    return results


def median(results: list[Result], key: str) -> float:
    return statistics.median(r[key] for r in results)


# --------------------------------------------------------------------------------------------
# sections


def prep(args: argparse.Namespace) -> Result:
    out: Result = {}
    for dataset in ("beauty", "ml-1m"):
        runs = alternate(
            {
                "rex": lambda d=dataset: worker(
                    "rex", "rex_worker.py", "prep", "--dataset", d, threads=args.threads
                ),
                "recbole": lambda d=dataset: worker(
                    "recbole", "recbole_worker.py", "prep", "--dataset", d, threads=args.threads
                ),
            },
            args.repeats,
        )
        out[dataset] = {
            name: {"seconds": median(r, "seconds"), "peak_rss_mb": median(r, "peak_rss_mb"), "runs": r}
            for name, r in runs.items()
        }
    return out


def sasrec(args: argparse.Namespace) -> Result:
    """SASRec's training throughput and full-ranking test evaluation, alternating."""
    batches = ["--warmup", str(args.warmup), "--batches", str(args.batches)]
    runs = alternate(
        {
            "rex": lambda: worker("rex", "rex_worker.py", "throughput", *batches, threads=args.threads),
            "recbole": lambda: worker(
                "recbole", "recbole_worker.py", "throughput", *batches, threads=args.threads
            ),
        },
        args.repeats,
    )
    return {
        name: {
            "samples_per_s": median(r, "samples_per_s"),
            "eval_s": median(r, "eval_s"),
            "peak_rss_mb": median(r, "peak_rss_mb"),
            "throughput_runs": r,
        }
        for name, r in runs.items()
    }


def budget(args: argparse.Namespace) -> Result:
    """Each sequential model on both sides with the same wall-clock budget and hyperparameters.

    The two sides of a model run at the same time, each on its share of the cores, so whatever
    else loads the machine loads both alike. ``budget_summary`` reads the curves."""
    threads = max(1, args.threads // 2)
    flags = ["--budget-s", str(args.budget_s)]
    out: Result = {}
    for model in args.models:
        with ThreadPoolExecutor(max_workers=2) as pool:
            sides = {
                name: pool.submit(worker, name, script, "budget", "--model", model, *flags, threads=threads)
                for name, script in (("rex", "rex_worker.py"), ("recbole", "recbole_worker.py"))
            }
            results = {name: future.result() for name, future in sides.items()}
        out[model] = {"threads": threads, **results}
    return out


def budget_summary(sides: Result) -> Result:
    """Per side: epochs within the budget, the best validation NDCG@10 among them, and the time
    to the bar, RecBole's best validation NDCG@10 at its budget's end (the wall time, training
    + validation, of the first epoch at or above it). An epoch that ended after the budget (the
    first always starts; a later one can run longer than the longest before it) does not count."""
    budget_s = sides["rex"]["budget_s"]
    counted = {
        name: [point for point in sides[name]["curve"] if point["wall_s"] <= budget_s]
        for name in ("rex", "recbole")
    }
    bar = max((point["val_ndcg@10"] for point in counted["recbole"]), default=None)
    out: Result = {"bar": bar}
    for name, points in counted.items():
        best = max(points, key=lambda point: point["val_ndcg@10"], default=None)
        reached = [point for point in points if bar is not None and point["val_ndcg@10"] >= bar]
        out[name] = {
            "best_val_ndcg@10": best["val_ndcg@10"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "epochs": len(points),
            "epochs_over_budget": len(sides[name]["curve"]) - len(points),
            "time_to_bar_s": reached[0]["wall_s"] if reached else None,
            # the epoch each side tested: its best validation epoch of all it ran
            "tested_epoch": max(
                sides[name]["curve"], key=lambda point: point["val_ndcg@10"], default={"epoch": None}
            )["epoch"],
        }
    return out


def deepfm(args: argparse.Namespace) -> Result:
    batches = ["--warmup", str(args.warmup), "--batches", str(args.batches * 4)]
    scripts = {"rex": "ctr_worker_rex.py", CTR_PEER: f"ctr_worker_{CTR_PEER}.py"}
    runs = alternate(
        {
            name: lambda name=name: worker(name, scripts[name], "throughput", *batches, threads=args.threads)
            for name in scripts
        },
        args.repeats,
    )
    # Test AUC moves by about 0.003 from one seed to the next, as much as the target allows:
    # several seeds, alternating, and their mean.
    accuracy: dict[str, list[Result]] = {name: [] for name in scripts}
    for seed in range(42, 42 + args.ctr_seeds):
        for name in scripts:
            accuracy[name].append(
                worker(name, scripts[name], "accuracy", "--seed", str(seed), threads=args.threads)
            )
    out: Result = {}
    for name in scripts:
        aucs = [run["test"]["auc"] for run in accuracy[name]]
        out[name] = {
            "train_rows_per_s": median(runs[name], "train_rows_per_s"),
            "eval_rows_per_s": median(runs[name], "eval_rows_per_s"),
            "test_auc": statistics.mean(aucs),
            "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "seeds": len(aucs),
            "epochs": statistics.mean(len(run.get("val_auc_per_epoch", [])) for run in accuracy[name]),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in accuracy[name]),
            "throughput_runs": runs[name],
            "accuracy_runs": accuracy[name],
        }
    return out


# --------------------------------------------------------------------------------------------
# report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def memory(rex: float, peer: float) -> str:
    """Peak RSS compared in the direction that reads as a ratio above 1."""
    return f"{peer / rex:.2f}× less" if rex <= peer else f"{rex / peer:.2f}× more"


def hit_at_10(test: Result) -> float:
    """HR@10: RecBole's ``hit@10``; rex's ``recall@10``, the same number with one target a user."""
    return test["hit@10"] if "hit@10" in test else test["recall@10"]


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def markdown(results: Result, machine: Result, measured: dict[str, str]) -> str:
    """The report; ``measured`` gives each section's date (``--only`` reruns some sections)."""
    when = "; ".join(f"{name} {date}" for name, date in measured.items() if name in results)
    lines = [
        "# rex against its peers",
        "",
        f"Sections measured on: {when}. Last run {machine['date']} on {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['threads']} torch threads per side), Python {machine['python']}, torch "
        f"{machine['torch']}; RecBole {machine.get('recbole', '?')}, torch-rechub "
        f"{machine.get('torch-rechub', '?')}. Medians of "
        f"{machine['repeats']} alternating runs (rex, peer, rex, peer, ...); the budget runs' "
        "figures from one run a side, DeepFM's test AUC from several seeds. Reproduce: `python benchmarks/peers/run.py`.",
        "",
    ]
    if "budget" in results:
        budget_s = next(iter(results["budget"].values()))["rex"]["budget_s"]
        lines += [
            f"## SASRec, BERT4Rec and GRU4Rec on Amazon Beauty: {budget_s / 60:g} minutes each",
            "",
            "Leave-one-out, full ranking over every item with no history masking on both sides "
            "(RecBole's sequential full ranking masks nothing; rex runs with "
            "`eval.exclude_history=false`). Both sides use RecBole's default hyperparameters for "
            "each model (SASRec: 64 wide, 2 layers, 2 heads, FFN 256, dropout 0.5; BERT4Rec: the "
            "same with dropout 0.2 and mask ratio 0.2; GRU4Rec: embedding 64, GRU 128, dropout "
            "0.3), Adam 1e-3, softmax CE over all items, max length 50 and batches of 2,048 "
            "samples (a RecBole training row, or one position of a rex sequence; rex's "
            "`train.batch_samples=2048`). Each side gets the same wall clock for training and "
            "per-epoch validation (data loading excluded); an epoch starts only if one as long as "
            "the longest so far still ends within it. The two sides of a model run at the same "
            "time, one torch thread each. The test is the best validation epoch's. *Time to "
            "RecBole's bar*: the wall time of the first epoch whose validation NDCG@10 reaches "
            "RecBole's best within its budget.",
            "",
            "| model | side | epochs | best val NDCG@10 (epoch) | test NDCG@10 | test HR@10 "
            "| time to RecBole's bar, s | rex advantage | peak RSS, MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model, sides in results["budget"].items():
            summary = budget_summary(sides)
            rex_time, peer_time = summary["rex"]["time_to_bar_s"], summary["recbole"]["time_to_bar_s"]
            for name in ("rex", "recbole"):
                side = {**sides[name], **summary[name]}
                test = side["test"]
                speedup = ratio(peer_time, rex_time)
                advantage = f"{fmt(speedup, 2)}×" if name == "rex" and speedup is not None else ""
                over = side["epochs_over_budget"]
                epochs = f"{side['epochs']}" + (f" (+{over} past the budget)" if over else "")
                best = (
                    f"{side['best_val_ndcg@10']:.4f} ({side['best_epoch']})"
                    if side["best_epoch"]
                    else "— (no epoch within the budget)"
                )
                # Each side tests its best epoch of all it ran: one that ended past the budget
                # is flagged rather than reported as within it.
                past = f" (epoch {side['tested_epoch']}, past the budget)"
                flag = past if side["tested_epoch"] != side["best_epoch"] else ""
                tested = f"{test['ndcg@10']:.4f}{flag} | {hit_at_10(test):.4f}" if test else "— | —"
                lines.append(
                    f"| {model} | {name} | {epochs} | {best} | {tested} "
                    f"| {fmt(side['time_to_bar_s'])} | {advantage} | {fmt(side['peak_rss_mb'], 0)} |"
                )
        lines.append("")
    if "sasrec" in results:
        rex, peer = results["sasrec"]["rex"], results["sasrec"]["recbole"]
        ev = ratio(peer["eval_s"], rex["eval_s"])
        lines += [
            "## SASRec throughput on Amazon Beauty",
            "",
            "SASRec at the benchmark's shape (64 wide, 2 layers, 2 heads, FFN 256, max length "
            "50), 2,048 samples a batch, fp32; medians of alternating runs, each side with all "
            "the threads.",
            "",
            "| measure | rex | RecBole | rex advantage | target | |",
            "|---|---|---|---|---|---|",
            f"| full-ranking test evaluation, s | {fmt(rex['eval_s'], 2)} | {fmt(peer['eval_s'], 2)} "
            f"| {fmt(ev, 2)}× | ≥ 5× | {verdict(ev is not None and ev >= 5)} |",
            f"| training samples/s | {fmt(rex['samples_per_s'], 0)} | {fmt(peer['samples_per_s'], 0)} "
            f"| {fmt(ratio(rex['samples_per_s'], peer['samples_per_s']), 2)}× | | |",
            f"| peak RSS, MB | {fmt(rex['peak_rss_mb'], 0)} | {fmt(peer['peak_rss_mb'], 0)} "
            f"| {memory(rex['peak_rss_mb'], peer['peak_rss_mb'])} | | |",
            "",
        ]
    if "deepfm" in results:
        rex, peer = results["deepfm"]["rex"], results["deepfm"][CTR_PEER]
        speed = ratio(rex["train_rows_per_s"], peer["train_rows_per_s"])
        gap = rex["test_auc"] - peer["test_auc"]
        lines += [
            "## DeepFM on Frappe (rex's random split, same rows on both sides)",
            "",
            "Embedding 10, MLP 400-400-400 with batch norm and dropout 0.2, Adam 1e-3, batch 4,096, "
            "fp32; each side trains with early stopping on validation AUC (patience 3) and tests "
            "its best epoch; peak RSS is the largest of the accuracy runs. The peer is "
            "torch-rechub 0.9.0: FuxiCTR's PyPI package has no models (they live in its GitHub "
            "model_zoo).",
            "",
            "| measure | rex | torch-rechub | rex advantage | target | |",
            "|---|---|---|---|---|---|",
            f"| training rows/s | {fmt(rex['train_rows_per_s'], 0)} | {fmt(peer['train_rows_per_s'], 0)} "
            f"| {fmt(speed, 2)}× | ≥ 1.5× | {verdict(speed is not None and speed >= 1.5)} |",
            f"| evaluation rows/s | {fmt(rex['eval_rows_per_s'], 0)} | {fmt(peer['eval_rows_per_s'], 0)} "
            f"| {fmt(ratio(rex['eval_rows_per_s'], peer['eval_rows_per_s']), 2)}× | | |",
            f"| peak RSS, MB | {fmt(rex['peak_rss_mb'], 0)} | {fmt(peer['peak_rss_mb'], 0)} "
            f"| {memory(rex['peak_rss_mb'], peer['peak_rss_mb'])} | | |",
            f"| test AUC, mean ± std of {rex['seeds']} seeds | {rex['test_auc']:.4f} ± {rex['test_auc_std']:.4f} "
            f"| {peer['test_auc']:.4f} ± {peer['test_auc_std']:.4f} | {gap:+.4f} | ≥ −0.003 | "
            f"{verdict(gap >= -0.003)} |",
            "",
        ]
    if "prep" in results:
        lines += [
            "## Data preparation: raw file to the first training batch",
            "",
            "rex: `rex data prepare` (every table of the dataset) + the recipe's data module + one "
            "batch. RecBole: `create_dataset` + `data_preparation` + one batch, from atomic files "
            "written beforehand by `export.py` (not counted). Imports are not counted on either side.",
            "",
            "| dataset | rex, s | RecBole, s | rex advantage | rex peak RSS, MB | RecBole peak RSS, MB |",
            "|---|---|---|---|---|---|",
        ]
        for dataset, sides in results["prep"].items():
            rex, peer = sides["rex"], sides["recbole"]
            lines.append(
                f"| {dataset} | {rex['seconds']:.2f} | {peer['seconds']:.2f} "
                f"| {fmt(ratio(peer['seconds'], rex['seconds']), 2)}× | {rex['peak_rss_mb']:.0f} "
                f"| {peer['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine_info(args: argparse.Namespace) -> Result:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, python in PYTHON.items():
        package = {"rex": "torch", "recbole": "recbole", "rechub": "torch-rechub"}[name]
        if python.exists():
            versions[package] = subprocess.run(
                [str(python), "-c", f"from importlib.metadata import version; print(version('{package}'))"],
                capture_output=True,
                text=True,
            ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "repeats": args.repeats,
        **versions,
    }


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


SECTIONS = {"prep": prep, "deepfm": deepfm, "sasrec": sasrec, "budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="sections to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed training batches per process")
    parser.add_argument("--batches", type=int, default=10, help="timed training batches per process")
    parser.add_argument("--budget-s", type=float, default=900.0, help="wall clock per side and model")
    parser.add_argument(
        "--models", nargs="+", default=["sasrec", "bert4rec", "gru4rec"], help="budget: models"
    )
    parser.add_argument("--ctr-seeds", type=int, default=3, help="DeepFM accuracy runs per side")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 batches, 60 s budgets")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batches, args.budget_s, args.ctr_seeds = 1, 1, 2, 60.0, 1
    if args.report:
        saved = json.loads((args.out.with_name(args.out.name + ".json")).read_text())
        machine, measured = saved.pop("machine"), saved.pop("measured", {})
        atomic_write(args.out.with_name(args.out.name + ".md"), markdown(saved, machine, measured) + "\n")
        return
    missing = [name for name, python in PYTHON.items() if not python.exists()]
    if missing:
        log(f"installing peers ({', '.join(missing)}): benchmarks/peers/install.sh")
        subprocess.check_call(["bash", str(HERE / "install.sh")], cwd=REPO)
    for export in ("export.py", "export_frappe.py"):  # the peers' input files, from rex's data
        subprocess.check_call([str(PYTHON["rex"]), str(HERE / export)], cwd=REPO)
    started = time.perf_counter()
    suffix = "-quick" if args.quick else ""
    json_path = args.out.with_name(args.out.name + suffix + ".json")
    # Sections not run this time keep their last results (``--only`` reruns some of them).
    results: Result = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.pop("machine", None)
    measured = results.pop("measured", {})
    machine = machine_info(args)
    for name in args.only or list(SECTIONS):
        log(f"section {name}")
        measured_now = SECTIONS[name](args)
        # A budget run of some models keeps the others' last results.
        results[name] = {**results.get(name, {}), **measured_now} if name == "budget" else measured_now
        measured[name] = machine["date"]
    machine["seconds"] = round(time.perf_counter() - started)
    report = markdown(results, machine, measured)
    atomic_write(
        json_path,
        json.dumps({"machine": machine, "measured": measured, **results}, indent=1),
    )
    atomic_write(args.out.with_name(args.out.name + suffix + ".md"), report + "\n")
    print(report)
    log(f"done in {machine['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
