"""Training keeps freed tensor memory for reuse instead of page-faulting it back in every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A training step's pattern: the same large block (64 MiB) allocated, touched and freed, again and
# again. With glibc's defaults every round mmaps it afresh and faults in all of its pages.
REPEATED_ALLOCATION_FAULTS = """
import json, resource, torch
from rex.engine.allocator import reuse_freed_memory
policy = reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 << 20)
before = faults()
for _ in range(30):
    torch.ones(16 << 20)
print(json.dumps({"policy": policy, "faults_per_round": (faults() - before) / 30}))
"""
PAGES_IN_64_MIB = (64 << 20) // 4096


def _repeated_allocation(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "REX_MALLOC"}
    if env_value is not None:
        env["REX_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", REPEATED_ALLOCATION_FAULTS],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_keeps_freed_blocks_and_system_faults_them_back_in():
    reused = _repeated_allocation(None)
    system = _repeated_allocation("system")
    assert reused["policy"] == "reuse" and system["policy"] == "system"
    assert system["faults_per_round"] > PAGES_IN_64_MIB * 0.9
    # Not zero: posix_memalign's padding lets the heap creep a little before it settles.
    assert reused["faults_per_round"] < PAGES_IN_64_MIB / 3


def test_a_bad_rex_malloc_value_is_a_clear_error():
    env = {**os.environ, "REX_MALLOC": "jemalloc"}
    code = "from rex.engine.allocator import reuse_freed_memory; reuse_freed_memory()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "REX_MALLOC must be 'reuse' or 'system', got 'jemalloc'" in out.stderr
