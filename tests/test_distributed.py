"""Two-process data-parallel pre-training under torchrun on the CPU (gloo): both ranks end with identical weights.

The launch is the documented one (`torchrun ... -m gmim_hub.cli.main pretrain ...`), except that torchrun starts a
small driver script which runs the same CLI `main()` and, when it returns, writes a per-tensor SHA-256 of *its own
rank's* model and the losses its rank saw. So the check reads each process's weights, not rank 0's file twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from _pretrain_fixtures import write_config, write_volumes
from safetensors.torch import load_file

from gmim_hub.engine.checkpoint import load_latest_checkpoint
from gmim_hub.engine.logger import read_metrics

pytestmark = pytest.mark.slow

DRIVER = '''
import hashlib, json, os, sys
import gmim_hub.engine.pretrain as P

seen = {"losses": []}
build, forward = P.build_run, P.forward_step

def build_run(*a, **k):
    seen["run"] = build(*a, **k)
    return seen["run"]

def forward_step(run, batch):
    result = forward(run, batch)
    seen["losses"].append(result.components["loss"])
    return result

P.build_run, P.forward_step = build_run, forward_step
from gmim_hub.cli.main import main
from gmim_hub.engine.distributed import unwrap_model
try:
    main()
finally:
    run = seen.get("run")
    if run is not None:
        sd = unwrap_model(run.model).state_dict()
        digests = {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                   for k, v in sd.items()}
        out = os.path.join(os.environ["GMIM_TEST_OUT"], "rank%s.json" % os.environ["RANK"])
        with open(out, "w") as f:
            json.dump({"digests": digests, "losses": seen["losses"], "step": run.step}, f)
'''


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_torchrun_two_ranks_hold_identical_weights(tmp_path):
    data = write_volumes(tmp_path / "imgs")
    cfg = write_config(tmp_path / "config.json")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    steps = 3  # 4 volumes / 2 ranks / batch 1 = 2 batches per epoch: the run crosses an epoch boundary
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           "pretrain", "--data", str(data), "--config", str(cfg), "-o", str(out), "--steps", str(steps),
           "--warmup", "1", "--batch-size", "1", "--num-workers", "0", "--device", "cpu", "--seed", "5",
           "--log-every", "1", "--eval-every", "0", "--preview-every", "0", "--ckpt-every", "2"]
    env = {**os.environ, "GMIM_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == steps
    assert r0["digests"] == r1["digests"]  # every parameter and buffer identical, bit for bit
    assert r0["losses"] != r1["losses"]  # yet the ranks trained on different batches and masks
    saved = load_file(out / "model" / "model.safetensors")
    assert {k: _sha(v) for k, v in saved.items()} == {k: r1["digests"][k] for k in saved}

    # rank 0 alone logs, and what it logs is the mean over the ranks
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for rec, a, b in zip(records, r0["losses"], r1["losses"], strict=True):
        assert rec["loss"] == pytest.approx((a + b) / 2, rel=1e-6)

    _, state = load_latest_checkpoint(out / "checkpoints")
    assert state["step"] == steps and state["train_args"]["world_size"] == 2
    # each rank's random state is saved for resume; masks come from the loaders' per-sample seeds, so no mask stream
    assert [set(s) for s in state["rank_states"]] == [{"rng"}, {"rng"}] and "mask_generator" not in state
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt-00000002.pt", "ckpt-00000002.pt.sha256", "ckpt-00000003.pt", "ckpt-00000003.pt.sha256"]
