"""Which process of a data-parallel run this is, and the one run folder all of them share.

Lightning starts the processes (its own launcher for ``train.devices > 1`` on one machine, or
``torchrun``/SLURM across machines) and owns the process group; rex only needs to know, before
the Trainer exists, whether this process writes the run folder, and which folder that is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from rex.config.errors import RexError
from rex.config.schema import Recipe

# Set by the first process before Lightning starts the others on its machine, which inherit it.
RUN_DIR_ENV = "REX_RUN_DIR"
# What launchers set in each process: torchrun (RANK), Lightning's launcher (LOCAL_RANK, NODE_RANK)
# and SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def world_size(recipe: Recipe) -> int | None:
    """Processes the recipe asks for; None for ``devices: auto`` (as many as there are devices)."""
    devices = recipe.train.devices
    return None if devices == "auto" else devices * recipe.train.num_nodes


def is_distributed(recipe: Recipe) -> bool:
    return world_size(recipe) != 1


def is_main_process(recipe: Recipe) -> bool:
    """True in the process that writes the run folder: global rank 0, or any single-process run
    (whatever a surrounding job array sets)."""
    if not is_distributed(recipe):
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def shared_run_dir(recipe: Recipe) -> Path | None:
    """The run folder every process of a distributed run writes into, when one is agreed.

    None means: create a new one (the main process of a run Lightning will spread over this
    machine's devices, which then passes it on through ``REX_RUN_DIR``). Processes started
    independently by torchrun or SLURM agree on the launcher's job id."""
    if not is_distributed(recipe):
        return None
    given = os.environ.get(RUN_DIR_ENV)
    if given:
        return Path(given)
    launched = [name for name in ("RANK", "SLURM_PROCID") if name in os.environ]
    # A launcher's single process (an sbatch script's one task, say) is a run of its own.
    processes = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if not launched or processes < 2:
        return None
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job == "none":
        job = os.environ.get("SLURM_JOB_ID", "")
    if not job:
        raise RexError(
            f"started by a launcher ({launched[0]} is set) with no job id to name one shared run "
            f"folder: set {RUN_DIR_ENV}=runs/<recipe>/<name> for every process, or pass torchrun --rdzv-id",
            key="train.devices",
        )
    return Path(recipe.logging.run_root).resolve() / recipe.name / f"job-{job}"


def barrier() -> None:
    """Wait for every process (a no-op outside a process group): readers of what the main process
    just wrote start only once it is written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
