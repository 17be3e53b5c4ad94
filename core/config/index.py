"""The index of built-in components: the module that registers each key, and its summary.

The registry imports a built-in module only when a recipe names one of its components, and
`rex list` prints from the index alone, so neither pays for importing torch and every component.
The index (``components.json`` beside this file) is generated from the modules themselves:

    python -m rex.config.index           # rewrite components.json after adding a component
    python -m rex.config.index --check   # exit 1 if it is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
from pathlib import Path

# Every module that registers built-in components. Listing them here, not relying on import
# order, means a built-in name is never missing from the registry or the index.
MODULES = (
    "rex.data.tasks",
    "rex.engine.optim",
    "rex.eval.evaluators",
    "rex.eval.generative",
    "rex.eval.metrics",
    "rex.eval.reconstruction",
    "rex.eval.retrieval",
    "rex.components.attention.cross",
    "rex.components.attention.low_rank",
    "rex.components.attention.search",
    "rex.components.attention.target",
    "rex.components.backbones.multi_scenario",
    "rex.components.clustering.kmeans",
    "rex.components.decoding.corp",
    "rex.components.decoding.usd",
    "rex.components.denoisers.absorbing",
    "rex.components.denoisers.conditional",
    "rex.components.denoisers.schedule",
    "rex.components.denoisers.synergy",
    "rex.components.embeddings.attributes",
    "rex.components.embeddings.field",
    "rex.components.encoders.gru",
    "rex.components.encoders.hierarchical",
    "rex.components.encoders.mlp",
    "rex.components.encoders.modality_table",
    "rex.components.encoders.sim_bucket",
    "rex.components.encoders.transformer",
    "rex.components.experts.bank",
    "rex.components.experts.cgc",
    "rex.components.experts.objectives",
    "rex.components.experts.scenario",
    "rex.components.experts.star",
    "rex.components.gates.fdaf",
    "rex.components.gates.router",
    "rex.components.interactions.cross",
    "rex.components.interactions.dual_attention",
    "rex.components.interactions.fm",
    "rex.components.interactions.self_attention",
    "rex.components.masks.csmf",
    "rex.components.losses.classification",
    "rex.components.losses.contrastive",
    "rex.components.losses.decouple",
    "rex.components.losses.diffusion",
    "rex.components.losses.generative",
    "rex.components.losses.preference",
    "rex.components.losses.reconstruction",
    "rex.components.losses.variational",
    "rex.components.models.ctr",
    "rex.components.models.dgenctr",
    "rex.components.models.diff_msin",
    "rex.components.models.dmae",
    "rex.components.models.dmgin",
    "rex.components.models.heterrec",
    "rex.components.models.multi_scenario",
    "rex.components.models.m3bsr",
    "rex.components.models.mmq",
    "rex.components.models.reg4rec",
    "rex.components.models.rqvae",
    "rex.components.models.sequential",
    "rex.components.models.tiger",
    "rex.components.models.two_tower",
    "rex.components.quantizers.parallel",
    "rex.components.quantizers.residual",
    "rex.components.variational.gsvr",
)
INDEX_FILE = Path(__file__).with_name("components.json")


@functools.cache
def builtin_index() -> dict[str, tuple[str, str]]:
    """key → (the module that registers it, its one-line summary), as ``components.json`` holds."""
    rows = json.loads(INDEX_FILE.read_text(encoding="utf-8"))
    return {key: (row["module"], row["summary"]) for key, row in rows.items()}


def generate() -> dict[str, dict[str, str]]:
    """The index, by importing each module in turn and noting the keys it registered. Run it in a
    fresh process: a module imported before would register nothing new here."""
    from rex.config.registry import _REGISTRY

    rows: dict[str, dict[str, str]] = {}
    for module in MODULES:
        before = set(_REGISTRY)
        importlib.import_module(module)
        for key in sorted(set(_REGISTRY) - before):
            # The module that defines it, not the first listed module that imports that one.
            defined_in = getattr(_REGISTRY[key].target, "__module__", module)
            rows[key] = {
                "module": defined_in if defined_in in MODULES else module,
                "summary": _REGISTRY[key].summary,
            }
    return dict(sorted(rows.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check the built-in component index.")
    parser.add_argument("--check", action="store_true", help="exit 1 if components.json is stale")
    args = parser.parse_args(argv)
    rows = generate()
    text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    if args.check:
        if INDEX_FILE.is_file() and INDEX_FILE.read_text(encoding="utf-8") == text:
            return 0
        print(f"{INDEX_FILE} is stale: run `python -m rex.config.index`", file=sys.stderr)
        return 1
    partial = INDEX_FILE.with_name(f".{INDEX_FILE.name}.tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, INDEX_FILE)
    print(f"wrote {INDEX_FILE} ({len(rows)} components)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
