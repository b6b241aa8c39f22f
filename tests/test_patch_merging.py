"""`GMIMConfig.patch_merging`: each variant equals a transcription of the MONAI code it names, whatever MONAI is
installed; converted original checkpoints compute what MONAI 1.4's Swin UNETR computed; old config.json files load as
what they were trained with; the fast CPU backend and the ONNX export honour the variant."""

from __future__ import annotations

import dataclasses
import itertools
import json

import monai
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets import swin_unetr as monai_swin
from packaging.version import Version
from torch import nn

from gmim_hub import GMIMConfig, GMIMForPretraining, GMIMForSegmentation
from gmim_hub.config import FORMAT_VERSION
from gmim_hub.errors import ConfigError
from gmim_hub.hub import convert_checkpoint
from gmim_hub.models.encoder import swin_kwargs
from gmim_hub.models.merging import PatchMerging3d, patch_merging_class


# ---- transcriptions, written here from MONAI's source (monai/networks/nets/swin_unetr.py), 3-D branch only ----
class Monai14PatchMerging(nn.Module):
    """MONAI 1.4.0 `PatchMerging.forward` (the class "previously defined in v0.9.0"; same since 0.9)."""

    def __init__(self, dim, norm_layer=nn.LayerNorm, spatial_dims=3):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x):
        b, d, h, w, c = x.size()
        pad_input = (h % 2 == 1) or (w % 2 == 1) or (d % 2 == 1)
        if pad_input:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
        x = self.norm(x)
        x = self.reduction(x)
        return x


class Monai16PatchMerging(Monai14PatchMerging):
    """MONAI 1.5.0 / 1.6.x `PatchMerging.forward`: x4..x6 take the three neighbours 1.4 missed or repeated."""

    def forward(self, x):
        b, d, h, w, c = x.size()
        pad_input = (h % 2 == 1) or (w % 2 == 1) or (d % 2 == 1)
        if pad_input:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 1::2, 0::2, :]
        x5 = x[:, 1::2, 0::2, 1::2, :]
        x6 = x[:, 0::2, 1::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
        x = self.norm(x)
        x = self.reduction(x)
        return x


class MonaiPatchMergingV2(Monai14PatchMerging):
    """MONAI `PatchMergingV2.forward` (1.2 to 1.6, unchanged)."""

    def forward(self, x):
        b, d, h, w, c = x.size()
        pad_input = (h % 2 == 1) or (w % 2 == 1) or (d % 2 == 1)
        if pad_input:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in itertools.product(range(2), range(2), range(2))], -1)
        x = self.norm(x)
        x = self.reduction(x)
        return x


TRANSCRIPTIONS = {"legacy": Monai14PatchMerging, "merging": Monai16PatchMerging, "mergingv2": MonaiPatchMergingV2}


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("variant", ["legacy", "merging", "mergingv2"])
@pytest.mark.parametrize("shape", [(2, 4, 6, 8, 5), (1, 3, 5, 7, 5)])  # even sides, and odd sides (zero padding)
def test_each_variant_equals_its_monai_transcription(variant, shape):
    ours = _randomised(patch_merging_class(variant)(dim=5), 1)
    ref = TRANSCRIPTIONS[variant](dim=5)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names: norm.*, reduction.weight
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_variants_compute_different_functions_with_the_same_weights():
    x = torch.randn(1, 4, 4, 4, 3, generator=torch.Generator().manual_seed(3))
    sd = _randomised(PatchMerging3d(dim=3), 4).state_dict()
    outs = {}
    for name in TRANSCRIPTIONS:
        m = patch_merging_class(name)(dim=3)
        m.load_state_dict(sd)
        outs[name] = m(x)
    assert not torch.allclose(outs["legacy"], outs["merging"], atol=1e-3)
    assert not torch.allclose(outs["merging"], outs["mergingv2"], atol=1e-3)


@pytest.mark.skipif(Version(monai.__version__) < Version("1.5"), reason="installed MONAI predates 1.5")
@pytest.mark.parametrize(("variant", "monai_cls"), [("merging", "PatchMerging"), ("mergingv2", "PatchMergingV2")])
def test_current_variants_equal_the_installed_monai_modules(variant, monai_cls):
    """An outside reference as well as the transcription: the installed MONAI (>= 1.5) classes themselves."""
    ours = _randomised(patch_merging_class(variant)(dim=4), 5)
    theirs = getattr(monai_swin, monai_cls)(dim=4, spatial_dims=3)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 6, 4, 2, 4, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def _monai_swin_unetr(cfg: GMIMConfig, merging: type[nn.Module]) -> SwinUNETR:
    """A plain MONAI SwinUNETR whose patch merging is a transcription (what that MONAI version built)."""
    kw = {**swin_kwargs(cfg), "downsample": merging}
    return SwinUNETR(out_channels=cfg.out_channels, norm_name=cfg.norm_name, **kw).eval()


@pytest.mark.parametrize("variant", ["legacy", "merging", "mergingv2"])
def test_segmenter_equals_monai_swin_unetr_with_the_transcribed_merging(tiny_config, tiny_input, variant):
    cfg = dataclasses.replace(tiny_config, patch_merging=variant)
    torch.manual_seed(7)
    seg = GMIMForSegmentation(cfg).eval()
    ref = _monai_swin_unetr(cfg, TRANSCRIPTIONS[variant])
    ref.load_state_dict(seg.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(seg(tiny_input), ref(tiny_input), rtol=0, atol=1e-6)


def _original_checkpoint(model: GMIMForPretraining) -> dict:
    """The original GMIM SSLHead checkpoint layout (online + shared target encoder, heads, 'vae' decoder)."""
    sd = {}
    for k, v in model.swinViT.state_dict().items():
        sd[f"module.swinViT.{k}"] = sd[f"module.swinViT_contrastive.{k}"] = v.clone()
    for ours, theirs in (("projector_x", "contrastive_head_x"), ("projector_y", "contrastive_head_y")):
        sd.update({f"module.{theirs}.{n}": v.clone() for n, v in getattr(model, ours).linear.state_dict().items()})
    sd.update({f"module.conv.{k}": v.clone() for k, v in model.decoder.blocks.state_dict().items()})
    return {"state_dict": sd, "epoch": 3}


def test_converted_original_checkpoint_computes_what_monai_14_computed(tiny_config, tiny_input, tmp_path):
    torch.manual_seed(8)
    source = GMIMForPretraining(tiny_config)
    torch.save(_original_checkpoint(source), tmp_path / "final_ckpt.pt")
    report = convert_checkpoint(tmp_path / "final_ckpt.pt", tmp_path / "converted", config=tiny_config)
    assert report.patch_merging == "legacy" and "patch_merging legacy" in report.summary()
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert saved["patch_merging"] == "legacy" and saved["format_version"] == FORMAT_VERSION

    seg = GMIMForSegmentation.from_pretrained_encoder(tmp_path / "converted", config=tiny_config).eval()
    assert seg.config.patch_merging == "legacy"  # taken from the weights, not the (default "merging") config given
    for merging, same in ((Monai14PatchMerging, True), (Monai16PatchMerging, False)):
        ref = _monai_swin_unetr(tiny_config, merging)
        ref.load_state_dict(seg.state_dict(), strict=True)  # MONAI 1.4's fine-tuning: encoder weights + same heads
        with torch.no_grad():
            ours, theirs = seg(tiny_input), ref(tiny_input)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5) is same
    # the pre-training encoder's deepest features too
    pre = GMIMForPretraining.from_pretrained(tmp_path / "converted").eval()
    ref14 = _monai_swin_unetr(tiny_config, Monai14PatchMerging)
    ref14.swinViT.load_state_dict(source.swinViT.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(pre.swinViT(tiny_input)[4], ref14.swinViT(tiny_input)[4], rtol=0, atol=1e-5)


def test_convert_accepts_an_explicit_patch_merging_and_rejects_a_bad_one(tiny_config, tmp_path):
    torch.manual_seed(9)
    torch.save(_original_checkpoint(GMIMForPretraining(tiny_config)), tmp_path / "c.pt")
    report = convert_checkpoint(tmp_path / "c.pt", tmp_path / "out", config=tiny_config, patch_merging="merging")
    assert report.patch_merging == "merging"
    with pytest.raises(ConfigError, match="patch_merging must be 'legacy', 'merging' or 'mergingv2', got 'v3'"):
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "out2", config=tiny_config, patch_merging="v3")
    assert not (tmp_path / "out2").exists()


def test_version_1_config_without_the_field_loads_as_merging(tiny_config, tiny_input, tmp_path):
    torch.manual_seed(10)
    model = GMIMForSegmentation(tiny_config).eval()
    folder = model.save_pretrained(tmp_path / "round1")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["patch_merging"] == "merging"
    del cfg["patch_merging"]  # what round-1 gmim-hub wrote (trained under MONAI 1.6, distinct-value entropies)
    for key in ("entropy_estimator", "histogram_bins", "histogram_range"):
        del cfg["masking"][key]
    cfg["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = GMIMForSegmentation.from_pretrained(folder)
    assert loaded.config.patch_merging == "merging" and loaded.config.format_version == FORMAT_VERSION
    assert loaded.config.masking.entropy_estimator == "unique"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_input), model(tiny_input), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"format_version": 1, "patch_merging": "legacy"}, "format_version 1 has no patch_merging, masking.entropy_"),
     ({"patch_merging": "v3"}, "patch_merging must be one of 'legacy', 'merging', 'mergingv2', got 'v3'"),
     ({"format_version": 3}, "format_version 3 is not supported")],
)
def test_bad_patch_merging_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        GMIMConfig.from_dict({**GMIMConfig().to_dict(), **changes})


def test_fast_cpu_backend_honours_legacy_merging(tiny_config, tiny_input):
    from gmim_hub.inference.fast import FastCPUBackend

    cfg = dataclasses.replace(tiny_config, patch_merging="legacy")
    torch.manual_seed(11)
    seg = GMIMForSegmentation(cfg).eval()
    ref = _monai_swin_unetr(cfg, Monai14PatchMerging)
    ref.load_state_dict(seg.state_dict(), strict=True)
    fast = FastCPUBackend(seg, precision="fp32", malloc_tuning=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(tiny_input), ref(tiny_input), rtol=1e-4, atol=1e-4)


def test_onnx_export_of_a_legacy_model_matches_pytorch(tiny_config, tmp_path):
    from gmim_hub.export.onnx import OnnxWindowModel, export_onnx

    cfg = dataclasses.replace(tiny_config, patch_merging="legacy")
    torch.manual_seed(12)
    seg = GMIMForSegmentation(cfg).eval()
    result = export_onnx(seg, tmp_path / "export", name="legacy", max_batch=2)
    assert result.manifest["config"]["patch_merging"] == "legacy"
    x = torch.randn(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(13))
    runner = OnnxWindowModel.from_export(result.onnx_path.parent)
    with torch.no_grad():
        expected = seg(x)
        other = _monai_swin_unetr(dataclasses.replace(cfg, patch_merging="merging"), Monai16PatchMerging)
        other.load_state_dict(seg.state_dict())
        merging_out = other(x)
    got = torch.as_tensor(runner(x.numpy()))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - merging_out).abs().max() > 1e-2  # the graph carries the legacy slices, not MONAI's current ones


def test_cli_convert_reports_and_records_the_patch_merging(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from gmim_hub.cli.main import app

    torch.manual_seed(14)
    torch.save(_original_checkpoint(GMIMForPretraining(tiny_config)), tmp_path / "c.pt")
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["convert", str(tmp_path / "c.pt"), str(tmp_path / "out"),
                                                         "--preset", "tiny"])
    assert res.exit_code == 0, res.output
    assert "patch merging" in res.output and "legacy" in res.output
    assert GMIMConfig.from_json_file(tmp_path / "out" / "config.json").patch_merging == "legacy"
