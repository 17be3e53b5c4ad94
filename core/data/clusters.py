"""Item groups: balanced K-means over one modality's item vectors, computed offline and cached.

DMGIN groups a user's long history by item cluster. The clustering is a data stage, not part
of training: ``rex data clusters NAME`` (the ``clusters_*`` DVC stage) runs ``cluster/kmeans``
over the prepared dataset's ``items`` vectors and caches the labels as
``<root>/_features/<name>_clusters.npy`` (row ``i`` = group of item id ``i``; padding id 0 is
labelled 0 without taking part, and models mask padding themselves) with a key file recording the dataset's
data hash and the params. A training run reads the cache through the datamodule context
(``item_groups``); when the cache is missing or stale (the dataset was rebuilt, the params
changed), it is recomputed first, as ``rex train`` prepares a missing dataset.

Params: section ``clusters:`` of params.yaml, one entry per dataset (defaults otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from rex.components.clustering.kmeans import BalancedKMeans
from rex.config.errors import DataError
from rex.data.build import Params
from rex.data.features import FEATURES_DIR, cached_array, item_vectors, write_cached
from rex.data.mirror import log
from rex.data.schema import data_hash, load_schema

SECTION = "clusters"
KEY_VERSION = 1


class ClusterParams(Params):
    """Params of one dataset's item clustering (``clusters: {<name>: ...}`` in params.yaml)."""

    modality: str = "text_minilm"  # which items-view vectors to cluster
    k: int = Field(20, ge=1)  # number of groups
    iters: int = Field(30, ge=1)  # Lloyd iterations at most
    seed: int = 2024


def cluster_params(name: str) -> ClusterParams:
    from rex.data.prepare import PARAMS_FILE, load_params, validate_params

    section = load_params().get(SECTION) or {}
    if not isinstance(section, dict):
        raise DataError(
            "expected a mapping of dataset name to clustering params", file=PARAMS_FILE, key=SECTION
        )
    params = validate_params(f"{SECTION}.{name}", ClusterParams, section.get(name), PARAMS_FILE)
    assert isinstance(params, ClusterParams)
    return params


def cluster_paths(name: str, root: Path) -> tuple[Path, Path]:
    """The (labels, key) files of ``name``'s clusters under the data root ``root``."""
    return root / FEATURES_DIR / f"{name}_clusters.npy", root / FEATURES_DIR / f"{name}_clusters.json"


def item_groups(directory: Path, params: ClusterParams | None = None, force: bool = False) -> np.ndarray:
    """Group ids (num_items,) int64 in [0, k) of the prepared dataset at ``directory``, from the
    cache when its key matches the dataset and the params, else computed and cached."""
    directory = Path(directory)
    name = directory.name
    params = params or cluster_params(name)
    schema = load_schema(directory)
    array_path, key_path = cluster_paths(name, directory.parent)
    key = {"version": KEY_VERSION, "data_hash": data_hash(directory), **params.model_dump()}
    shape = (schema.num_items,)
    if not force:
        cached = cached_array(array_path, key_path, key, shape, np.int64)
        if cached is not None:
            return cached
    vectors = item_vectors(directory, schema)
    if params.modality not in vectors:
        available = ", ".join(sorted(vectors)) or "none"
        raise DataError(
            f"dataset {name!r} has no {params.modality!r} item vectors to cluster (it has: {available})",
            file="params.yaml",
            key=f"{SECTION}.{name}.modality",
        )
    started = time.perf_counter()
    kmeans = BalancedKMeans(params.k, params.iters, params.seed)
    # Row 0 is padding (a zero vector): it takes no part in the clustering and is labelled 0.
    labels = np.zeros(schema.num_items, dtype=np.int64)
    labels[1:] = kmeans.fit(torch.from_numpy(vectors[params.modality][1:])).numpy()
    log(
        f"{name}: {params.k} balanced K-means groups of {params.modality} in {time.perf_counter() - started:.1f}s"
    )
    write_cached(array_path, key_path, labels, key)
    return labels


def prepare_clusters(name: str, root: Path | None = None, force: bool = False) -> Path:
    """``rex data clusters NAME``: cluster the prepared dataset (preparing it first if needed)."""
    from rex.data.prepare import ensure_dataset

    directory = ensure_dataset(name, root=root)
    item_groups(directory, force=force)
    return cluster_paths(name, directory.parent)[0]
