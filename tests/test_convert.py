"""Foreign checkpoint conversion: the two layouts (built from real state dicts renamed into them), the prefix table,
refusal of malicious pickles, and the `gmim convert` command."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gmim_hub import ConfigError, GMIMForPretraining, GMIMForSegmentation, WeightsError
from gmim_hub.cli.main import app
from gmim_hub.hub import convert_checkpoint, remap_state_dict
from gmim_hub.models import MaskedSwinEncoder

runner = CliRunner()


def _gmim_original(model: GMIMForPretraining, prefix: str = "") -> dict:
    """The original SSLHead checkpoint layout, from our model's tensors."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.swinViT.state_dict().items():
        sd[f"{prefix}swinViT.{k}"] = v.clone()
        sd[f"{prefix}swinViT_contrastive.{k}"] = v.clone()
    for ours, theirs in (("projector_x", "contrastive_head_x"), ("projector_y", "contrastive_head_y")):
        for name, v in getattr(model, ours).linear.state_dict().items():
            sd[f"{prefix}{theirs}.{name}"] = v.clone()
    for k, v in model.decoder.blocks.state_dict().items():
        sd[f"{prefix}conv.{k}"] = v.clone()
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 4e-4, "params": [0]}]}
    return {"state_dict": sd, "optimizer": optimizer, "global_step": 3}


_SSL_HEADS = ("norm.weight", "norm.bias", "rotation_head.weight", "rotation_head.bias", "contrastive_head.weight",
              "contrastive_head.bias", "convTrans3d.weight", "convTrans3d.bias")


def _swinunetr_ssl(encoder: MaskedSwinEncoder) -> dict:
    """MONAI's model_swinvit.pt layout: module.-prefixed encoder keys, old mlp.fc1/fc2 names, its own heads."""
    sd = {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v.clone()
          for k, v in encoder.state_dict().items()}
    sd.update({f"module.{k}": torch.randn(4) for k in _SSL_HEADS})
    return {"state_dict": sd}


@pytest.fixture(scope="module")
def source_model(tiny_config):
    torch.manual_seed(20)
    return GMIMForPretraining(tiny_config)


def test_decoder_indices_match_the_original_vae_head(source_model):
    convs = [i for i, m in enumerate(source_model.decoder.blocks) if isinstance(m, nn.Conv3d)]
    assert convs == [0, 4, 8, 12, 16, 20]  # conv.0 Conv, conv.1 IN, conv.2 LeakyReLU, conv.3 Upsample, ... conv.20
    assert [type(m).__name__ for m in source_model.decoder.blocks[:4]] == [
        "Conv3d", "InstanceNorm3d", "LeakyReLU", "Upsample"]


@pytest.mark.parametrize(
    ("layout", "key", "expected"),
    [
        ("gmim-original", "swinViT.layers2.0.blocks.0.attn.qkv.weight", "swinViT.layers2.0.blocks.0.attn.qkv.weight"),
        ("gmim-original", "module.swinViT.patch_embed.proj.bias", "swinViT.patch_embed.proj.bias"),
        ("gmim-original", "contrastive_head_x.weight", "projector_x.linear.weight"),
        ("gmim-original", "contrastive_head_y.bias", "projector_y.linear.bias"),
        ("gmim-original", "conv.20.weight", "decoder.blocks.20.weight"),
        ("swinunetr-ssl", "module.layers1.0.blocks.0.mlp.fc1.weight", "swinViT.layers1.0.blocks.0.mlp.linear1.weight"),
        ("swinunetr-ssl", "module.layers4.0.downsample.reduction.weight", "swinViT.layers4.0.downsample.reduction.weight"),
        ("swinunetr-ssl", "module.patch_embed.proj.weight", "swinViT.patch_embed.proj.weight"),
        ("swinunetr-ssl", "swin_vit.layers3.0.blocks.0.mlp.fc2.bias", "swinViT.layers3.0.blocks.0.mlp.linear2.bias"),
    ],
)
def test_prefix_table_maps_keys(layout, key, expected):
    report = remap_state_dict({key: torch.zeros(1)}, layout)
    assert report.mapped == [(key, expected)] and report.dropped == []


@pytest.mark.parametrize(
    ("layout", "key"),
    [("gmim-original", "swinViT_contrastive.patch_embed.proj.weight"), ("swinunetr-ssl", "module.norm.weight"),
     ("swinunetr-ssl", "module.rotation_head.bias"), ("swinunetr-ssl", "module.convTrans3d.weight")],
)
def test_prefix_table_drops_foreign_heads(layout, key):
    report = remap_state_dict({key: torch.zeros(1), "swinViT.patch_embed.proj.bias": torch.zeros(1)}, layout)
    assert report.dropped == [key]


@pytest.mark.parametrize(
    ("sd", "layout", "error", "message"),
    [
        ({"swinViT.a": torch.zeros(1), "head.w": torch.zeros(1)}, "gmim-original", WeightsError,
         "1 key(s) match no rule of layout 'gmim-original' (head.w)"),
        ({"encoder.w": torch.zeros(1)}, "auto", WeightsError, "cannot tell the checkpoint layout from its keys"),
        ({"swinViT.a": torch.zeros(1)}, "timm", ConfigError,
         "layout must be one of auto, gmim-original, swinunetr-ssl, got 'timm'"),
        ({"swinViT_contrastive.a": torch.zeros(1)}, "gmim-original", WeightsError, "no tensor of the checkpoint maps"),
    ],
)
def test_remap_errors(sd, layout, error, message):
    with pytest.raises(error) as err:
        remap_state_dict(sd, layout)
    assert message in str(err.value)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_gmim_original_checkpoint_converts_completely(source_model, tiny_config, tmp_path, prefix):
    torch.save(_gmim_original(source_model, prefix), tmp_path / "final_ckpt.pt")
    report = convert_checkpoint(tmp_path / "final_ckpt.pt", tmp_path / "out", config=tiny_config)
    n_enc = len(source_model.swinViT.state_dict())
    assert report.layout == "gmim-original" and report.initialised == []
    assert len(report.dropped) == n_enc and all(k.startswith(prefix + "swinViT_contrastive.") for k in report.dropped)
    assert len(report.mapped) == len(source_model.state_dict())
    loaded = GMIMForPretraining.from_pretrained(tmp_path / "out")
    ref = source_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_swinunetr_ssl_checkpoint_converts_the_encoder(source_model, tiny_config, tmp_path):
    torch.save(_swinunetr_ssl(source_model.swinViT), tmp_path / "model_swinvit.pt")
    report = convert_checkpoint(tmp_path / "model_swinvit.pt", tmp_path / "out", config=tiny_config)
    assert report.layout == "swinunetr-ssl"
    assert sorted(report.dropped) == sorted(f"module.{k}" for k in _SSL_HEADS)
    assert report.initialised == ["projector_x", "projector_y", "decoder"]
    assert "initialised (not in the checkpoint): projector_x, projector_y, decoder" in report.summary()
    seg = GMIMForSegmentation.from_pretrained_encoder(tmp_path / "out")
    enc = source_model.swinViT.state_dict()
    assert all(torch.equal(v, enc[k.removeprefix("swinViT.")]) for k, v in seg.state_dict().items()
               if k.startswith("swinViT."))


def test_ema_config_starts_the_target_as_the_online_encoder(source_model, tiny_config, tmp_path):
    torch.save(_swinunetr_ssl(source_model.swinViT), tmp_path / "model_swinvit.pt")
    cfg = dataclasses.replace(tiny_config, target_momentum=0.99)
    convert_checkpoint(tmp_path / "model_swinvit.pt", tmp_path / "out", config=cfg)
    loaded = GMIMForPretraining.from_pretrained(tmp_path / "out")
    for a, b in zip(loaded.swinViT.parameters(), loaded.target_swinViT.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incomplete_encoder_and_wrong_architecture_are_rejected(source_model, tiny_config, tmp_path):
    ckpt = _swinunetr_ssl(source_model.swinViT)
    del ckpt["state_dict"]["module.layers2.0.blocks.0.attn.proj.weight"]
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"1 missing \(swinViT\.layers2\.0\.blocks\.0\.attn\.proj\.weight\)"):
        convert_checkpoint(tmp_path / "partial.pt", tmp_path / "out", config=tiny_config)
    torch.save(_swinunetr_ssl(source_model.swinViT), tmp_path / "full.pt")
    with pytest.raises(ConfigError, match="checkpoint has feature_size 12 and in_channels 1, the config 12 and 4"):
        convert_checkpoint(tmp_path / "full.pt", tmp_path / "out",
                           config=dataclasses.replace(tiny_config, in_channels=4))


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_config):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"swinViT.x": torch.zeros(1)}, "hook": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError) as err:
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out", config=tiny_config)
    assert not marker.exists() and not (tmp_path / "out").exists()
    msg = str(err.value)
    assert "refused to load" in msg and "weights_only=True" in msg and "re-save just its tensors" in msg
    assert "Unsupported global: GLOBAL io.open was not an allowed global by default" in msg
    assert "\n" not in msg
    # control: the payload is live, so the refusal above is what kept it from running
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()


def test_unreadable_or_empty_checkpoints(tmp_path, tiny_config):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pt is not a readable PyTorch checkpoint \(Unsupported operand"):
        convert_checkpoint(tmp_path / "junk.pt", tmp_path / "out", config=tiny_config)
    torch.save({"state_dict": {"a": 1}}, tmp_path / "ints.pt")
    with pytest.raises(WeightsError, match="holds no state dict of tensors"):
        convert_checkpoint(tmp_path / "ints.pt", tmp_path / "out", config=tiny_config)
    with pytest.raises(WeightsError, match="no checkpoint file at"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out", config=tiny_config)


def test_cli_help_lists_commands_and_layouts():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "convert" in result.output and "push" in result.output
    result = runner.invoke(app, ["convert", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("gmim-original", "swinunetr-ssl", "auto", "model_swinvit.pt", "weights_only=True"):
        assert text in result.output


def test_cli_convert_prints_a_report(source_model, tmp_path):
    torch.save(_swinunetr_ssl(source_model.swinViT), tmp_path / "model_swinvit.pt")
    result = runner.invoke(app, ["convert", str(tmp_path / "model_swinvit.pt"), str(tmp_path / "out"),
                                 "--preset", "tiny"], terminal_width=200)
    assert result.exit_code == 0, result.output
    n = len(source_model.swinViT.state_dict())
    rows: dict[str, str] = {}
    last = ""
    for line in result.output.splitlines():  # rich wraps long cells onto continuation lines with an empty key
        if line.count("│") == 3:
            key, value = (c.strip() for c in line.split("│")[1:3])
            last = key or last
            rows[last] = f"{rows[last]} {value}" if not key else value
    assert rows["layout"] == "swinunetr-ssl" and rows["mapped tensors"] == str(n)
    assert rows["dropped tensors"] == "8 (norm.* 2, rotation_head.* 2, contrastive_head.* 2, convTrans3d.* 2)"
    assert rows["left initialised"] == "projector_x, projector_y, decoder"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out"), "--preset", "tiny"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no checkpoint file at" in result.stderr
    result = runner.invoke(app, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out"), "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset 'huge'" in result.stderr


def test_cli_convert_with_a_partial_config_file(source_model, tmp_path):
    import json

    torch.save(_swinunetr_ssl(source_model.swinViT), tmp_path / "model_swinvit.pt")
    partial = {"feature_size": 12, "depths": [2, 1, 1, 1], "roi_size": [64, 64, 64], "projector_dim": 64,
               "masking": {"grids": [2, 4, 8]}, "data": {"modality": "CT", "intensity": "ct_window"}}
    (tmp_path / "cfg.json").write_text(json.dumps(partial))
    result = runner.invoke(app, ["convert", str(tmp_path / "model_swinvit.pt"), str(tmp_path / "out"),
                                 "--config", str(tmp_path / "cfg.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["data"]["modality"] == "CT" and saved["feature_size"] == 12
    (tmp_path / "bad.json").write_text(json.dumps({"feature_size": 12, "colour": "red"}))
    result = runner.invoke(app, ["convert", str(tmp_path / "model_swinvit.pt"), str(tmp_path / "out2"),
                                 "--config", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "unknown config key(s) colour" in result.stderr
