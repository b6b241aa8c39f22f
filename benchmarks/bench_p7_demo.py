"""P7: the README's main job (`gmim demo`'s training part: data, pre-training, fine-tuning, evaluation) with glibc's
default allocator settings against gmim's CPU training settings (`gmim_hub.malloc.tune_malloc`, applied by
`gmim pretrain` / `gmim train` on the CPU), same seed, same data, same threads, each side in its own process.

What changes between the sides is only the environment variable GMIM_MALLOC_TUNING ("0": glibc defaults, the
"before"; unset: what a user gets), so both sides compute the same numbers: the script checks that the final
pre-training loss and the validation Dice are equal. Reported per side: wall seconds of pre-training and
fine-tuning, steps/s, minor page faults and system CPU seconds of the process (getrusage), Dice.

The demo's settings are used (`gmim_hub.demo_context.FULL`: 40 pre-training steps, 120 fine-tuning steps, tiny
preset at 2 mm); `--pretrain-steps` / `--finetune-steps` shorten them (the ratio is one of seconds per step, and
both sides compute the same numbers at any length); `--quick` uses the demo's QUICK settings (a few steps, for
checking the script). The sides run one after the other, alternating over `--repeats` rounds (default 1; each
round is two whole training runs).

    python benchmarks/bench_p7_demo.py [--quick] [--repeats N] [--pretrain-steps N] [--finetune-steps N]
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import SideProcess, alternate, base_parser, final_line, set_threads, summary, write_result

FIELDS = ("pretrain_s", "finetune_s", "pretrain_steps", "finetune_steps", "final_pretrain_loss", "dice",
          "minor_faults", "system_s", "user_s")


def build_side(malloc_tuning: bool, root: str, quick: bool, steps: dict[str, int]):
    """Runs in the side's own process: one call = the demo's data, pre-training, fine-tuning and evaluation steps
    in a fresh folder; returns FIELDS as a float64 array."""
    if not malloc_tuning:
        os.environ["GMIM_MALLOC_TUNING"] = "0"
    else:
        os.environ.pop("GMIM_MALLOC_TUNING", None)
    from gmim_hub.demo import DEMO_STEPS, run_demo
    from gmim_hub.demo_context import FULL, QUICK

    settings = dataclasses.replace(QUICK if quick else FULL, **steps)
    steps = [s for s in DEMO_STEPS if s.name in ("data", "pretrain", "finetune", "evaluate")]
    runs = iter(range(1_000))

    def run() -> np.ndarray:
        out = Path(root) / f"{'tuned' if malloc_tuning else 'default'}-{next(runs)}"
        before = resource.getrusage(resource.RUSAGE_SELF)
        ctx = run_demo(out, settings=settings, steps=steps)
        after = resource.getrusage(resource.RUSAGE_SELF)
        records = (out / "pretrain" / "metrics.jsonl").read_text().splitlines()
        loss = [json.loads(r)["loss"] for r in records if "loss" in json.loads(r)][-1]  # full precision
        return np.array([ctx.timings["pretrain"], ctx.timings["finetune"], settings.pretrain_steps,
                         settings.finetune_steps, loss, ctx.report.mean_dice, after.ru_minflt - before.ru_minflt,
                         after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime], dtype=np.float64)
    return run


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=None, help="instead of the demo's 40")
    p.add_argument("--finetune-steps", type=int, default=None, help="instead of the demo's 120")
    args = p.parse_args()
    steps = {k: v for k, v in (("pretrain_steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps))
             if v is not None}
    set_threads(args.threads)
    repeats = args.repeats or 1
    root = tempfile.mkdtemp(prefix="gmim-p7-")
    sides = {name: SideProcess("benchmarks.bench_p7_demo:build_side",
                               {"malloc_tuning": name == "tuned", "root": root, "quick": args.quick,
                                "steps": steps},
                               threads=args.threads) for name in ("default", "tuned")}
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in sides}

    def recording(name: str):
        def call() -> float:
            dt = sides[name]()
            rows[name].append(dict(zip(FIELDS, (float(v) for v in sides[name].output()), strict=True)))
            return dt
        return call

    try:
        times = alternate({n: recording(n) for n in sides}, repeats=repeats, warmup=0)
    finally:
        for side in sides.values():
            side.close()
    result: dict[str, dict[str, float]] = {}
    for name, runs in rows.items():
        med = {k: float(np.median([r[k] for r in runs])) for k in FIELDS}
        med["pretrain_steps_per_s"] = med["pretrain_steps"] / med["pretrain_s"]
        med["finetune_steps_per_s"] = med["finetune_steps"] / med["finetune_s"]
        med["train_s"] = med["pretrain_s"] + med["finetune_s"]
        result[name] = med
        print(f"{name:8s} pre-training {med['pretrain_s']:.1f} s ({med['pretrain_steps_per_s']:.3f} steps/s), "
              f"fine-tuning {med['finetune_s']:.1f} s ({med['finetune_steps_per_s']:.3f} steps/s), "
              f"minor faults {med['minor_faults']:.3g}, system {med['system_s']:.1f} s, user {med['user_s']:.1f} s, "
              f"Dice {med['dice']:.4f}")
    d, t = result["default"], result["tuned"]
    ratio = d["train_s"] / t["train_s"]
    same = d["dice"] == t["dice"] and d["final_pretrain_loss"] == t["final_pretrain_loss"]
    write_result("p7_demo", {
        "measure": "gmim demo's data + pre-training + fine-tuning + evaluation steps (" +
                   ("QUICK" if args.quick else "FULL") + f" settings, {steps or 'demo step counts'}), seconds of pre-training + fine-tuning",
        "before": "GMIM_MALLOC_TUNING=0 (glibc malloc defaults)", "after": "defaults (malloc tuned on the CPU)",
        "repeats": repeats, "threads_per_side": args.threads, "ratio": ratio,
        "pretrain_speedup": t["pretrain_steps_per_s"] / d["pretrain_steps_per_s"],
        "finetune_speedup": t["finetune_steps_per_s"] / d["finetune_steps_per_s"],
        "same_loss_and_dice": same, "sides": result, "whole_run_seconds": {n: summary(v) for n, v in times.items()},
        "target": {"ratio": 2.0, "dice_within": 0.01}}, enabled=not args.no_write)
    print(final_line("P7", ratio, None, default_s=d["train_s"], tuned_s=t["train_s"], dice=t["dice"],
                     same_loss_and_dice=same))


if __name__ == "__main__":
    main()
