"""P2: whole-volume prediction of the MNI152 1 mm T1 (197 x 233 x 189) with 96^3 windows and overlap 0.5:
gmim's `Predictor` with its default backend against a hand-written MONAI script (`sliding_window_inference` with
Gaussian blending around an eager fp32 `SwinUNETR`), same weights, same threads, alternating.

Baseline script: z-score over non-zero voxels (MONAI `NormalizeIntensity(nonzero=True)`, what the model's config
asks for), `sliding_window_inference(roi 96, sw_batch_size 4, overlap 0.5, mode "gaussian")`, argmax.
gmim: the model saved with `save_pretrained` and loaded by `Predictor.from_pretrained(folder, sw_batch_size=4,
overlap=0.5)` with its defaults, i.e. exactly what `gmim predict` runs (backend "auto" = OpenVINO when the package is
installed, else the fast CPU backend; bf16 where the CPU has it); `predict_volume` also runs orientation/spacing and their inverse,
and computes a window holding one value (the zero background) once per volume. Agreement = share of voxels with
the same label.
Each side runs in its own spawned process (as in P1), so the fast backend's process-wide malloc tuning cannot
speed up the baseline; the parent alternates them and each times its own whole-volume run.

Weights: a seeded random initialisation by default. Its logits are close to ties almost everywhere (median top-2
margin ~0.2), so bf16 rounding flips more labels than it would for a trained model; `--model DIR` runs both sides
with the weights of a trained segmentation model instead (a `save_pretrained` folder with a 96^3 ROI, e.g. from
`gmim train`), which is the agreement a user sees.

A feature_size-48 volume is 48 windows (minutes per side on 2 cores): `--quick` uses feature_size 12 and a 144^3
central crop (8 windows). `--feature-size` picks the width.

`--openvino` adds the issue's peer: the same MONAI script with the network compiled by OpenVINO in bf16 (f32 where
the CPU plugin lists no BF16) from a plain opset-17 ONNX export, batch 1 per window; the result then also reports
gmim's ratio against it. gmim's own OpenVINO cache goes to a temporary folder (`GMIM_CACHE_DIR`).

`--no-baseline` (with `--openvino`) leaves the eager fp32 script out, when only the ratio against the peer is wanted
(the eager baseline takes ~10x longer than either).

    python benchmarks/bench_p2_volume.py [--quick] [--feature-size 48] [--crop 144] [--model DIR] [--openvino]
                                         [--no-baseline]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import SideProcess, alternate, base_parser, final_line, set_threads, summary, write_result

ROI = (96, 96, 96)


def volume_config(feature_size: int, out_channels: int = 4):
    from gmim_hub.config import PRESETS, DataConfig

    data = DataConfig(modality="MRI", intensity="zscore_nonzero", spacing=(1.0, 1.0, 1.0), orientation="RAS")
    return dataclasses.replace(PRESETS["base"], feature_size=feature_size, out_channels=out_channels, use_v2=False,
                               roi_size=ROI, data=data)


def mni_volume(crop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 1 mm T1 as float32 (X, Y, Z) with its affine; optionally a central crop^3 (affine shifted)."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    vol, affine = np.asarray(img.get_fdata(), dtype=np.float32), np.array(img.affine)
    if crop:
        starts = [max((s - crop) // 2, 0) for s in vol.shape]
        vol = vol[tuple(slice(s, s + crop) for s in starts)]
        affine[:3, 3] += affine[:3, :3] @ np.array(starts)
    return np.ascontiguousarray(vol), affine


def build_side(kind: str, model_dir: str, crop: int | None, sw_batch_size: int, overlap: float):
    """Runs in a side's own process: load the saved weights, warm up on one window, return one whole-volume run
    (-> (X, Y, Z) uint8 labels)."""
    from gmim_hub.models.hub_models import GMIMForSegmentation

    vol, affine = mni_volume(crop)
    window = torch.zeros(1, 1, *ROI)
    if kind == "gmim":  # exactly what `gmim predict` builds, with its defaults
        from gmim_hub.inference.predictor import Predictor

        predictor = Predictor.from_pretrained(model_dir, device="cpu", sw_batch_size=sw_batch_size, overlap=overlap)
        predictor.runner(window)
        return lambda: predictor.predict_volume(vol, affine).labels
    if kind == "peer-openvino":
        return _peer_openvino(model_dir, vol, sw_batch_size, overlap)
    if kind != "baseline":
        raise ValueError(f"unknown side {kind!r}")
    # The hand-written MONAI script: normalise, Gaussian sliding window, eager fp32, argmax.
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity

    from gmim_hub.models.segmentation import monai_swin_unetr

    seg = GMIMForSegmentation.from_pretrained(model_dir)
    model = monai_swin_unetr(seg.config).eval()
    model.load_state_dict(seg.state_dict())  # the same weights (the state dicts match strictly)
    del seg
    with torch.inference_mode():
        model(window)

    def run() -> np.ndarray:
        with torch.inference_mode():
            img = NormalizeIntensity(nonzero=True)(torch.from_numpy(vol)[None])[None].float()
            logits = sliding_window_inference(img, ROI, sw_batch_size, model, overlap=overlap, mode="gaussian")
            return logits[0].argmax(0).to(torch.uint8).numpy()
    return run


def _peer_openvino(model_dir: str, vol: np.ndarray, sw_batch_size: int, overlap: float):
    """The MONAI script around OpenVINO: normalise, Gaussian sliding window, each window through the compiled model."""
    import openvino as ov
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity

    from gmim_hub.models.hub_models import GMIMForSegmentation

    seg = GMIMForSegmentation.from_pretrained(model_dir).eval()
    path = Path(tempfile.mkdtemp(prefix="gmim-p2-peer-")) / "model.onnx"
    torch.onnx.export(seg, (torch.zeros(1, 1, *ROI),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"])
    del seg
    core = ov.Core()
    hint = "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
    request = compiled.create_infer_request()

    def net(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            request.infer({0: x[i:i + 1].numpy()})
            outs.append(torch.from_numpy(request.get_output_tensor(0).data.copy()))
        return torch.cat(outs)
    net(torch.zeros(1, 1, *ROI))

    def run() -> np.ndarray:
        with torch.inference_mode():
            img = NormalizeIntensity(nonzero=True)(torch.from_numpy(vol)[None])[None].float()
            logits = sliding_window_inference(img, ROI, sw_batch_size, net, overlap=overlap, mode="gaussian")
            return logits[0].argmax(0).to(torch.uint8).numpy()
    return run


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=None, help="default 48 (12 with --quick)")
    p.add_argument("--crop", type=int, default=None, help="central crop edge (default: whole volume; 144 quick)")
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--model", type=Path, default=None, help="trained segmentation model folder (ROI 96)")
    p.add_argument("--openvino", action="store_true", help="also time MONAI's sliding window around OpenVINO bf16")
    p.add_argument("--no-baseline", action="store_true", help="with --openvino: do not time the eager fp32 script")
    args = p.parse_args()
    if args.no_baseline and not args.openvino:
        p.error("--no-baseline needs --openvino (there would be nothing to compare with)")
    fs = args.feature_size or (12 if args.quick else 48)
    crop = args.crop or (144 if args.quick else None)
    repeats = args.repeats or (1 if args.quick else 2)
    set_threads(args.threads)
    from gmim_hub.inference.backends import choose_backend
    from gmim_hub.inference.predictor import Predictor
    from gmim_hub.models.hub_models import GMIMForSegmentation

    tmp = tempfile.TemporaryDirectory(prefix="gmim-p2-")
    os.environ["GMIM_CACHE_DIR"] = str(Path(tmp.name) / "cache")  # inherited by the sides: a cold, private cache
    if args.model is not None:  # a trained model: both sides get its weights
        cfg, model_dir = GMIMForSegmentation.from_pretrained(args.model).config, args.model
        fs = cfg.feature_size
        if tuple(cfg.roi_size) != ROI:
            raise SystemExit(f"--model {args.model} has roi_size {cfg.roi_size}; P2 is defined for 96^3 windows")
    else:
        cfg = volume_config(fs)
        torch.manual_seed(0)
        model_dir = Path(tmp.name) / "model"
        GMIMForSegmentation(cfg).save_pretrained(model_dir)
    kwargs = {"model_dir": str(model_dir), "crop": crop, "sw_batch_size": args.sw_batch_size,
              "overlap": args.overlap}
    sides = {n: SideProcess("benchmarks.bench_p2_volume:build_side", {"kind": n, **kwargs}, threads=args.threads)
             for n in ("gmim", *([] if args.no_baseline else ["baseline"]), *(["peer-openvino"] if args.openvino else []))}
    try:
        times = alternate(dict(sides), repeats=repeats, warmup=0)  # warmed up on one window at build
        outputs = {n: s.output() for n, s in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    vol, affine = mni_volume(crop)
    vol_shape = vol.shape
    predictor = Predictor(cfg, lambda w: w, sw_batch_size=args.sw_batch_size, overlap=args.overlap)
    predictor.predict_volume(vol, affine)  # the identity network: counts the windows gmim computes and reuses
    reused = predictor.window_stats["reused"]
    stats = {n: summary(t) for n, t in times.items()}
    ratio = agree = None
    if "baseline" in stats:
        ratio = stats["baseline"]["median"] / stats["gmim"]["median"]
        agree = float((outputs["gmim"] == outputs["baseline"]).mean())
    peer = None
    if "peer-openvino" in stats:
        peer = {"ratio": stats["peer-openvino"]["median"] / stats["gmim"]["median"],
                "agreement": float((outputs["gmim"] == outputs["peer-openvino"]).mean()),
                "peer_vs_baseline_agreement": (float((outputs["peer-openvino"] == outputs["baseline"]).mean())
                                               if "baseline" in outputs else None),
                "description": "MONAI sliding_window_inference around OpenVINO (bf16 where listed) from an ONNX "
                               "export", "target": {"ratio": 1.5, "agreement": 0.995}}
    n_windows = predictor.count_windows(vol_shape)
    for name, s in stats.items():
        print(f"{name:9s} median {s['median']:.2f} s for {n_windows} windows ({s['median'] / n_windows:.3f} s/window)")
    print(f"gmim computed {n_windows - reused} of them ({reused} windows of one value reused)")
    bench_id = ("p2_volume" if args.model is None else "p2_volume_trained") + ("_vs_openvino" if args.no_baseline else "")
    write_result(bench_id, {
        "weights": "seeded random" if args.model is None else f"trained: {args.model}",
        "measure": f"MNI152 1mm {'x'.join(map(str, vol_shape))}, roi 96, overlap {args.overlap}, fs{fs}",
        "windows": n_windows, "windows_reused_by_gmim": reused, "sw_batch_size": args.sw_batch_size, "feature_size": fs, "crop": crop,
        "quick": args.quick, "repeats": repeats, "ratio": ratio, "agreement": agree, "sides": stats,
        "gmim_backend": "Predictor.from_pretrained defaults (gmim predict): backend auto, precision auto",
        "gmim_resolved_backend": list(choose_backend("auto", "auto", "cpu")), "threads_per_side": args.threads,
        "vs_peer_openvino": peer,
        "baseline": "NormalizeIntensity + sliding_window_inference + MONAI SwinUNETR eager fp32",
        "target": {"ratio": 3.0, "agreement": 0.995}}, enabled=not args.no_write)
    extra = {"vs_peer": peer["ratio"], "peer_agreement": peer["agreement"]} if peer else {}
    if "baseline" in stats:
        extra["baseline_s"] = stats["baseline"]["median"]
    print(final_line("P2", ratio, agree, gmim_s=stats["gmim"]["median"], windows=n_windows, feature_size=fs,
                     windows_reused=reused, **extra))


if __name__ == "__main__":
    main()
