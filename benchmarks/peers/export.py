"""Writes RecBole atomic files for the peer benchmark from the raw mirror files rex reads.

Runs in the rex venv (it reads the raw archives through rex's mirror). RecBole starts from
atomic files, so this conversion is the step a RecBole user writes themselves; its time is
reported beside RecBole's own dataset build, not inside it.

* ``beauty``: the S3-Rec Beauty sequences rex's ``beauty`` dataset reads, one row per
  interaction, ``timestamp`` = position in the user's sequence (the file has order, no time).
* ``ml-1m``: the (user, movie) pairs rex's ``ml-1m`` dataset reads, with the same user
  (gender, age, occupation, zip prefix) and movie (release year, first genre) features.

    python benchmarks/peers/export.py            # -> benchmarks/.peers/data/recbole/<name>/
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq

from rex.data.prepare import fetch_dataset

OUT = Path(__file__).resolve().parents[1] / ".peers" / "data" / "recbole"
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _write(path: Path, header: list[str], rows: list[list[str]] | list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write((row if isinstance(row, str) else "\t".join(row)) + "\n")
    tmp.replace(path)


def export_beauty(out: Path) -> int:
    raw = fetch_dataset("beauty") / "s3rec" / "Beauty.txt"
    lines = []
    for line in raw.read_text().splitlines():
        user, *items = line.split()
        lines += [f"{user}\t{item}\t{position}" for position, item in enumerate(items)]
    _write(out / "beauty" / "beauty.inter", ["user_id:token", "item_id:token", "timestamp:float"], lines)
    return len(lines)


def _dat(path: Path, encoding: str) -> list[list[str]]:
    return [line.split("::") for line in path.read_text(encoding=encoding).splitlines() if line]


def export_ml1m(out: Path) -> int:
    base = fetch_dataset("ml-1m") / "ml-1m"
    pairs = pq.read_table(base / "ratings.parquet", columns=["userID", "movieID"])
    users = pairs.column("userID").to_numpy(zero_copy_only=False)
    movies = pairs.column("movieID").to_numpy(zero_copy_only=False)
    lines = [f"{u}\t{m}" for u, m in zip(users.tolist(), movies.tolist(), strict=True)]
    folder = out / "ml-1m"
    _write(folder / "ml-1m.inter", ["user_id:token", "item_id:token"], lines)
    _write(
        folder / "ml-1m.user",
        ["user_id:token", "gender:token", "age:token", "occupation:token", "zip:token"],
        [[u, g, a, o, z[:3]] for u, g, a, o, z in _dat(base / "users.dat", "utf-8")],
    )
    movie_rows = []
    for movie, title, genres in _dat(base / "movies.dat", "latin-1"):
        year = match.group(1) if (match := _YEAR.search(title)) else ""
        movie_rows.append([movie, year, genres.split("|")[0]])
    _write(folder / "ml-1m.item", ["item_id:token", "release_year:token", "genre:token"], movie_rows)
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    seconds = {}
    for name, export in (("beauty", export_beauty), ("ml-1m", export_ml1m)):
        started = time.perf_counter()
        rows = export(args.out)
        seconds[name] = round(time.perf_counter() - started, 2)
        print(f"{name}: {rows} interactions -> {args.out / name} in {seconds[name]} s")
    (args.out / "export_seconds.json").write_text(json.dumps(seconds))


if __name__ == "__main__":
    main()
