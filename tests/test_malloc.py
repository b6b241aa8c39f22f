"""glibc malloc tuning (`gmim_hub.malloc`), which CPU inference and CPU training apply: a large block freed and
allocated again reuses pages that are already mapped (no new page faults, counted by the kernel), and
GMIM_MALLOC_TUNING=0 leaves glibc's defaults. Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, numpy as np
from gmim_hub.malloc import tune_malloc_unless_disabled
tuned = tune_malloc_unless_disabled()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(16 << 20, dtype=np.float32); del a  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
start = faults()
for _ in range(5):
    a = np.ones(16 << 20, dtype=np.float32); del a
print(tuned, (faults() - start) / 5)
"""


def _probe(env_value: str | None) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k != "GMIM_MALLOC_TUNING"}
    if env_value is not None:
        env["GMIM_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_mapped_pages_and_can_be_turned_off():
    tuned, faults = _probe(None)
    assert tuned and faults < 4  # the block comes back from the heap, already mapped
    off, faults_off = _probe("0")
    # glibc's default maps each 64 MiB block afresh: at least one fault per 2 MiB huge page, 16384 with 4 KiB pages
    assert not off and faults_off > 16
