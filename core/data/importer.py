"""``rex data import``: a prepared dataset from your own files and a short YAML mapping.

The mapping names the interaction file (CSV, Parquet or a RecBole atomic ``.inter``), which of
its columns are the user, item, timestamp and rating, an optional label rule for the ctr view,
optional user/item feature files and the split::

    name: my-ml100k
    interactions: {path: ml-100k.inter}              # format: csv | parquet | recbole (else the suffix)
    columns: {user: user_id, item: item_id, timestamp: timestamp, rating: rating}
    label: {column: rating, threshold: 4}            # ctr label = rating >= 4; no label, no ctr view
    user_features: {path: ml-100k.user, columns: {age: age, gender: gender}}
    item_features:
      path: ml-100k.item
      columns:
        genre: {column: class, first_token: true, unknown: [unknown]}
    split: {protocol: leave_one_out, fractions: [0.8, 0.1, 0.1], seed: 2024}
    ctr_max_history: 50
    duplicates: drop                                 # or keep: rows equal in every mapped column

Paths are relative to the mapping file. Rows that agree on every column the mapping reads (user,
item, timestamp, label) are indistinguishable in the dataset: they are counted in a warning and,
unless ``duplicates: keep``, dropped (the first of each stays).

The result is the same dataset form as ``rex data prepare`` writes (Lance tables + schema.json
under ``<data root>/<name>/``, views ``sequence`` and, with a label rule, ``ctr``), built by the
same core (:mod:`rex.data.interactions`) and written atomically, so ``rex train RECIPE
data.name=<name>`` trains on it.

Every problem with the mapping or the files is a :class:`DataError` that names the file and,
for the data, the line (row for Parquet) and column; nothing is written unless all is well.
That includes data no model could train on: ids that are not scalars or hold a NUL byte, an
empty split, and a ctr train split of a single class.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rex.config.base import Strict
from rex.config.errors import DataError
from rex.data.build import CTR_TABLES, DATASETS, MIN_SEQUENCE, Built, SplitFractions
from rex.data.interactions import CtrSplit, SideFeatures, build_interactions
from rex.data.mirror import log, sha256_file
from rex.data.prepare import data_root, write_dataset
from rex.data.schema import DatasetSchema

Format = Literal["csv", "parquet", "recbole"]
SUFFIX_FORMATS: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".inter": "recbole",
    ".user": "recbole",
    ".item": "recbole",
}
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
# Columns every ctr row has: a feature may not take one of these names.
RESERVED = ("user", "item", "label", "history")


# --------------------------------------------------------------------------------------------
# the mapping


class FileSpec(Strict):
    """A file to read: its path (relative to the mapping), format and, for CSV, separator."""

    path: str
    format: Format | None = None
    sep: str = Field(",", min_length=1, max_length=1, description="csv only; recbole is always a tab")


class Roles(Strict):
    """Which interaction column plays which role (the keys are the roles)."""

    user: str
    item: str
    timestamp: str | None = None
    rating: str | None = None


class Feature(Strict):
    """A categorical feature column, with optional clean-up of its tokens."""

    column: str
    first_token: bool = Field(False, description="keep only the first space-separated token")
    unknown: list[str] = Field(default_factory=list, description="tokens that mean unknown (id 0)")


class FeatureFile(FileSpec):
    """User or item features: one row per raw id, keyed by ``key`` (default: the id's column)."""

    key: str | None = None
    columns: dict[str, str | Feature] = Field(min_length=1)

    def features(self) -> dict[str, Feature]:
        return {
            name: spec if isinstance(spec, Feature) else Feature(column=spec)
            for name, spec in self.columns.items()
        }


class LabelRule(Strict):
    """The ctr label: ``column >= threshold``, or the column itself when it already holds 0/1."""

    column: str | None = Field(None, description="default: the rating column")
    threshold: float | None = None


class SplitSpec(Strict):
    """Sequence view: leave-one-out. Ctr view: random (train, valid, test) row fractions + seed."""

    protocol: Literal["leave_one_out"] = "leave_one_out"
    fractions: SplitFractions = (0.8, 0.1, 0.1)
    seed: int = 2024


class ImportMapping(Strict):
    """The whole mapping file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    interactions: FileSpec
    columns: Roles
    label: LabelRule | None = None
    user_features: FeatureFile | None = None
    item_features: FeatureFile | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    ctr_max_history: int = Field(50, ge=1)
    duplicates: Literal["drop", "keep"] = "drop"

    @property
    def label_column(self) -> str | None:
        """The interaction column the label rule reads (None without a label rule)."""
        if self.label is None:
            return None
        return self.label.column or self.columns.rating

    @model_validator(mode="after")
    def _consistent(self) -> ImportMapping:
        if self.label is not None and self.label_column is None:
            raise ValueError("label: name its column, or map a rating column under columns")
        names = [n for f in (self.user_features, self.item_features) if f is not None for n in f.columns]
        clash = sorted({n for n in names if n in RESERVED or names.count(n) > 1})
        if clash:
            raise ValueError(
                f"feature name(s) {', '.join(clash)} clash with {', '.join(RESERVED)} or each other"
            )
        return self


def load_mapping(path: Path) -> ImportMapping:
    """Read and validate a mapping file; every mistake is a DataError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("mapping file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataError(f"not valid YAML: {where}{problem}", file=str(path)) from exc
    if not isinstance(raw, dict):
        raise DataError("expected a mapping with name, interactions and columns", file=str(path))
    try:
        return ImportMapping.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        key = ".".join(loc)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            known = _fields_at(ImportMapping, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            what = "role" if loc[:-1] == ["columns"] else "key"
            message = f"unknown {what}" + (f" (did you mean {close[0]}?)" if close else "")
            message += f"; known: {', '.join(known)}"
        raise DataError(message, file=str(path), key=key or None) from exc


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the (nested) model at ``loc`` ([] where ``loc`` is not a model)."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        nested = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type)]
        models = [a for a in nested if issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


# --------------------------------------------------------------------------------------------
# reading files with located errors

# An id is a token that must be a scalar without NUL bytes: it keys users and items.
Kind = Literal["id", "token", "number"]


@dataclass(frozen=True)
class Source:
    """A resolved input file: where the mapping names it, its path and its format."""

    key: str
    path: Path
    format: Format
    sep: str

    def at(self, row: int) -> str:
        """Where data row ``row`` (0-based) is, for messages: a line of a text file, a Parquet row."""
        if self.format == "parquet":
            return f"row {row + 1}"
        return f"line {_line_of_row(self.path, row)}"


def resolve(spec: FileSpec, key: str, base: Path, mapping_file: Path) -> Source:
    path = (base / spec.path).expanduser()
    if not path.is_file():
        raise DataError(f"file not found (named by {key}.path in {mapping_file})", file=str(path))
    fmt = spec.format or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path.name} from its suffix; set format: {', '.join(get_args(Format))}",
            file=str(mapping_file),
            key=f"{key}.format",
        )
    return Source(key, path, fmt, "\t" if fmt == "recbole" else spec.sep)


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line of data row ``row`` in a text file with a header (empty lines are skipped)."""
    with open(path, "rb") as handle:
        handle.readline()
        seen = -1
        for number, line in enumerate(handle, start=2):
            if line.strip(b"\r\n"):
                seen += 1
                if seen == row:
                    return number
    return row + 2


def read_file(source: Source, wanted: dict[str, Kind]) -> dict[str, np.ndarray]:
    """Read the ``wanted`` columns: numbers as finite float64, ids and tokens as strings."""
    if source.path.stat().st_size == 0:
        raise DataError("empty file: expected a header line and rows", file=str(source.path))
    read = _read_parquet if source.format == "parquet" else _read_delimited
    table = read(source, list(wanted))
    if table.num_rows == 0:
        raise DataError("header only: no data rows", file=str(source.path))
    out: dict[str, np.ndarray] = {}
    for name, kind in wanted.items():
        column = table.column(name).combine_chunks()
        out[name] = (
            _numbers(source, name, column) if kind == "number" else _tokens(source, name, column, kind)
        )
    return out


def _tokens(source: Source, name: str, column: pa.Array, kind: Kind) -> np.ndarray:
    """A column as strings; an id column must not hold a NUL byte (numpy would strip a trailing
    one, merging ``u1\\0`` into ``u1``)."""
    what = "an id" if kind == "id" else "a feature"
    try:
        strings = None if pa.types.is_nested(column.type) else column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        strings = None
    if strings is None:
        raise DataError(
            f"column {name!r} holds {column.type} values: {what} column must be a scalar (string or integer)",
            file=str(source.path),
        )
    if kind == "id":
        blank = pc.or_kleene(pc.is_null(strings), pc.equal(pc.utf8_trim_whitespace(strings), ""))
        missing = np.flatnonzero(pc.fill_null(blank, True).to_numpy(zero_copy_only=False))
        if len(missing):
            raise DataError(
                f"{source.at(int(missing[0]))}, column {name!r}: the id is empty; every row needs one "
                f"({len(missing):,} {'row lacks' if len(missing) == 1 else 'rows lack'} it): fill them in or "
                "drop those rows",
                file=str(source.path),
            )
        nul = np.flatnonzero(
            pc.fill_null(pc.match_substring(strings, "\x00"), False).to_numpy(zero_copy_only=False)
        )
        if len(nul):
            row = int(nul[0])
            raise DataError(
                f"{source.at(row)}, column {name!r}: id {strings[row].as_py()!r} holds a NUL byte; remove it",
                file=str(source.path),
            )
    return strings.to_numpy(zero_copy_only=False)


def _first_non_utf8_line(path: Path) -> int:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _header(source: Source) -> list[str]:
    with open(source.path, "rb") as handle:
        first = handle.readline()
        rest = handle.read(4096)
    try:
        line = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError("line 1: not UTF-8 text", file=str(source.path)) from None
    if not line.strip():
        raise DataError("empty file: expected a header line and rows", file=str(source.path))
    if not rest.strip():
        raise DataError("header only: no data rows", file=str(source.path))
    fields = (
        line.split("\t") if source.format == "recbole" else next(csv.reader([line], delimiter=source.sep))
    )
    if len(fields) == 1:
        other = next((s for s in ("\t", ",", ";", "|") if s != source.sep and s in line), None)
        if other is not None:
            hint = (
                f"RecBole atomic files are tab-separated; for another separator set {source.key}.format: "
                "csv and its sep"
                if source.format == "recbole"
                else f"set {source.key}.sep"
            )
            raise DataError(
                f"line 1 has a single column {line[:60]!r}: wrong separator? It contains {other!r} but is "
                f"read with {source.sep!r} ({hint})",
                file=str(source.path),
            )
    names = fields
    if source.format == "recbole":
        names = []
        for index, field in enumerate(fields, start=1):
            name, _, kind = field.partition(":")
            if kind not in RECBOLE_TYPES:
                raise DataError(
                    f"line 1, field {index} {field!r}: a RecBole header field is name:type with type one "
                    f"of {', '.join(RECBOLE_TYPES)}",
                    file=str(source.path),
                )
            names.append(name)
    seen: dict[str, int] = {}
    for index, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(
                f"line 1: duplicate column {name!r} (fields {seen[name]} and {index})", file=str(source.path)
            )
        seen[name] = index
    return names


def _check_present(source: Source, names: list[str], wanted: list[str]) -> None:
    missing = [n for n in wanted if n not in names]
    if missing:
        raise DataError(
            f"no column {', '.join(map(repr, missing))} (mapped in {source.key}); columns: {', '.join(names)}",
            file=str(source.path),
        )


def _read_delimited(source: Source, wanted: list[str]) -> pa.Table:
    names = _header(source)
    _check_present(source, names, wanted)

    def parse(threads: bool, on_bad_row: Callable[[Any], str]) -> pa.Table:
        return pacsv.read_csv(
            source.path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names, use_threads=threads),
            parse_options=pacsv.ParseOptions(
                delimiter=source.sep,
                # RecBole fields (titles) hold quotes: they are split on tabs only.
                quote_char=False if source.format == "recbole" else '"',
                invalid_row_handler=on_bad_row,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string())
            ),
        )

    bad: list[Any] = []

    def record(row: Any) -> str:
        bad.append(row)
        return "skip"

    try:
        table = parse(True, record)
        if bad and bad[0].number is None:
            # Only a single-threaded parse knows line numbers: redo it to locate the row.
            bad.clear()
            parse(False, record)
    except (pa.ArrowInvalid, OSError) as exc:
        text = str(exc).splitlines()[0]
        if "UTF8" in text:
            raise DataError(
                f"line {_first_non_utf8_line(source.path)}: not UTF-8 text", file=str(source.path)
            ) from exc
        raise DataError(f"cannot parse as {source.format}: {text}", file=str(source.path)) from exc
    if bad:
        row = bad[0]
        # The parser numbers rows from 1 at the header and does not count empty lines.
        raise DataError(
            f"line {_line_of_row(source.path, row.number - 2)}: {row.actual_columns} field(s) where the header has "
            f"{row.expected_columns} (separator {source.sep!r}): {row.text[:80]!r}",
            file=str(source.path),
        )
    return table


def _read_parquet(source: Source, wanted: list[str]) -> pa.Table:
    try:
        names = pq.read_schema(source.path).names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"duplicate column(s) {', '.join(dupes)}", file=str(source.path))
        _check_present(source, names, wanted)
        return pq.read_table(source.path, columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"not a readable Parquet file: {str(exc).splitlines()[0]}", file=str(source.path)
        ) from exc


def _numbers(source: Source, name: str, column: pa.Array) -> np.ndarray:
    """A column as finite float64; the first bad value is reported with its line (row) and column."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = column.cast(pa.int64())
    try:
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        row = _first_uncastable(column)
    else:
        bad = np.flatnonzero(~np.isfinite(values))
        if not len(bad):
            return values
        row = int(bad[0])
    value = column[row].as_py()
    shown = "an empty value" if value in (None, "") else repr(value)
    raise DataError(f"{source.at(row)}, column {name!r}: {shown} is not a number", file=str(source.path))


def _first_uncastable(column: pa.Array) -> int:
    """The first index whose value does not cast to float64 (bisection: log2(rows) prefix casts)."""
    low, high = 0, len(column)  # column[:low] casts; column[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        try:
            column.slice(0, middle).cast(pa.float64())
            low = middle
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            high = middle
    return low


# --------------------------------------------------------------------------------------------
# the import


@dataclass(frozen=True)
class Imported:
    schema: DatasetSchema
    directory: Path


def _side(
    spec: FeatureFile | None, key: str, id_column: str, base: Path, mapping_file: Path
) -> tuple[SideFeatures | None, Source | None]:
    if spec is None:
        return None, None
    source = resolve(spec, key, base, mapping_file)
    id_name = spec.key or id_column
    features = spec.features()
    wanted: dict[str, Kind] = {**{f.column: "token" for f in features.values()}, id_name: "id"}
    data = read_file(source, wanted)
    ids = data[id_name].astype(str)
    uniques, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(np.flatnonzero(counts > 1)[0])
        again = int(np.flatnonzero(ids == uniques[dup])[1])
        raise DataError(
            f"{source.at(again)}, column {id_name!r}: id {str(uniques[dup])!r} already has a row "
            f"({source.at(int(first[dup]))})",
            file=str(source.path),
        )
    columns: dict[str, np.ndarray] = {}
    for name, feature in features.items():
        tokens = data[feature.column].astype(str)
        columns[name] = np.char.partition(tokens, " ")[:, 0] if feature.first_token else tokens
    unknown = {name: frozenset(f.unknown) for name, f in features.items() if f.unknown}
    return SideFeatures(ids, columns, source.path, unknown), source


def _labels(values: np.ndarray, rule: LabelRule, source: Source, column: str) -> np.ndarray:
    if rule.threshold is not None:
        return (values >= rule.threshold).astype(np.float32)
    bad = np.flatnonzero((values != 0) & (values != 1))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{source.at(row)}, column {column!r}: label {values[row]:g} is not 0 or 1 "
            "(set label.threshold to binarise a rating)",
            file=str(source.path),
        )
    return values.astype(np.float32)


def _distinct_rows(data: dict[str, np.ndarray], source: Source, mapping: ImportMapping) -> np.ndarray:
    """The rows to import, in file order: all, or with ``duplicates: drop`` the first of each set
    of rows equal in every column read (they would be the same interaction twice)."""
    codes = np.stack(
        [np.unique(values, return_inverse=True)[1].reshape(-1) for values in data.values()], axis=1
    )
    first = np.sort(np.unique(codes, axis=0, return_index=True)[1])
    count = len(codes) - len(first)
    if count == 0 or mapping.duplicates == "keep":
        if count:
            log(f"{mapping.name}: kept {count} duplicate row(s) of {source.path} (duplicates: keep)")
        return np.arange(len(codes))
    log(
        f"{mapping.name}: warning: {count} of {len(codes)} rows of {source.path} repeat an earlier row in every "
        "mapped column: dropped (set duplicates: keep to keep them)"
    )
    return first


def _check_splits(built: Built, mapping: ImportMapping, inter: Source, mapping_path: Path) -> None:
    """Refuse a split nothing can be trained or evaluated on; warn where only the AUC will suffer."""
    if built.tables["seq_train"].num_rows == 0:
        raise DataError(
            f"the sequence view would be empty: all {built.counts['raw_users']} users have fewer than "
            f"{MIN_SEQUENCE} interactions (leave-one-out needs a train item, a valid and a test target each)",
            file=str(inter.path),
        )
    if "ctr" not in built.views:
        return
    for table, fraction in zip(CTR_TABLES, mapping.split.fractions, strict=True):
        split = table.removeprefix("ctr_")
        labels = built.tables[table].column("label")
        if len(labels) == 0:
            raise DataError(
                f"the ctr {split} split is empty ({fraction:g} of {built.counts['raw_interactions']} rows); "
                "raise its fraction or import more rows",
                file=str(mapping_path),
                key="split.fractions",
            )
        classes = pc.unique(labels)
        if len(classes) > 1:
            continue
        only = f"every label of the ctr {split} split of {inter.path.name} is {classes[0].as_py():g}"
        if split == "train":
            raise DataError(
                f"{only}: there is nothing to learn and AUC is undefined; change the label rule",
                file=str(mapping_path),
                key="label",
            )
        log(f"{mapping.name}: warning: {only}: its AUC will be NaN")


def import_dataset(mapping_path: Path, root: Path | None = None) -> Imported:
    """Read the mapping and its files, build both views and write ``<root>/<name>/`` atomically."""
    mapping_path = Path(mapping_path)
    mapping = load_mapping(mapping_path)
    if mapping.name in DATASETS:
        raise DataError(
            f"{mapping.name!r} is a built-in dataset (rex data prepare {mapping.name}); choose another name",
            file=str(mapping_path),
            key="name",
        )
    base = mapping_path.parent
    inter = resolve(mapping.interactions, "interactions", base, mapping_path)
    roles = mapping.columns
    wanted: dict[str, Kind] = {roles.user: "id", roles.item: "id"}
    if roles.timestamp is not None:
        wanted[roles.timestamp] = "number"
    label_column = mapping.label_column
    if label_column is not None:
        wanted[label_column] = "number"
    data = read_file(inter, wanted)

    user_features, user_source = _side(mapping.user_features, "user_features", roles.user, base, mapping_path)
    item_features, item_source = _side(mapping.item_features, "item_features", roles.item, base, mapping_path)
    labels = None
    if mapping.label is not None and label_column is not None:
        labels = _labels(data[label_column], mapping.label, inter, label_column)
    # After the label check, whose messages give line numbers of the file as it is.
    rows = _distinct_rows(data, inter, mapping)
    data = {name: values[rows] for name, values in data.items()}
    labels = labels[rows] if labels is not None else None

    built = build_interactions(
        mapping.name,
        data[roles.user],
        data[roles.item],
        data[roles.timestamp] if roles.timestamp is not None else None,
        labels,
        CtrSplit(mapping.split.fractions, mapping.split.seed, mapping.ctr_max_history),
        user_features=user_features,
        item_features=item_features,
    )
    _check_splits(built, mapping, inter, mapping_path)
    files = [mapping_path] + [s.path for s in (inter, user_source, item_source) if s is not None]
    digests = {f.name: sha256_file(f) for f in files}
    source = {
        "import": mapping_path.name,
        "sha256": hashlib.sha256("".join(digests.values()).encode()).hexdigest(),
        "files": digests,
    }
    root = Path(root) if root is not None else data_root()
    schema = write_dataset(root, mapping.name, built, params=mapping.model_dump(mode="json"), source=source)
    log(f"{mapping.name}: imported at {root / mapping.name}")
    return Imported(schema, root / mapping.name)
