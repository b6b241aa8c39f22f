"""The models: MONAI weight compatibility, gradient flow of the Siamese pre-training net, input checks."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import gmim_hub
import gmim_hub.models
from gmim_hub import GMIMForPretraining, GMIMForSegmentation, InputError
from gmim_hub.models import monai_swin_unetr

ROOT = Path(gmim_hub.__file__).parent


def test_encoder_weights_load_into_monai_swin_unetr_strictly(tiny_config, tiny_input):
    torch.manual_seed(1)
    pre = GMIMForPretraining(tiny_config).eval()
    ref = monai_swin_unetr(tiny_config).eval()
    ref.swinViT.load_state_dict(pre.swinViT.state_dict(), strict=True)
    # and as SwinUNETR keys: exactly the encoder part of the full state dict
    missing, unexpected = ref.load_state_dict({f"swinViT.{k}": v for k, v in pre.swinViT.state_dict().items()},
                                              strict=False)
    assert unexpected == [] and not any(k.startswith("swinViT.") for k in missing)
    with torch.no_grad():
        ours, theirs = pre.swinViT(tiny_input), ref.swinViT(tiny_input, normalize=True)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_segmenter_state_dict_loads_into_monai_swin_unetr_with_matching_outputs(tiny_config, tiny_input):
    torch.manual_seed(2)
    seg = GMIMForSegmentation(tiny_config).eval()
    ref = monai_swin_unetr(tiny_config).eval()
    ref.load_state_dict(seg.state_dict(), strict=True)
    assert list(seg.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        out, expected = seg(tiny_input), ref(tiny_input)
    assert out.shape == (1, tiny_config.out_channels, 64, 64, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def _loss(out, generator):
    target = torch.randn(out.reconstruction.shape, generator=generator)
    return (out.z_x ** 2).mean() + (out.z_y ** 2).mean() + ((out.reconstruction - target) ** 2).mean()


def test_every_parameter_gets_a_gradient_and_the_target_branch_none(tiny_config, tiny_input):
    torch.manual_seed(3)
    model = GMIMForPretraining(tiny_config).train()
    assert model.target_swinViT is None  # momentum 0: the target shares the online weights (stop-gradient)
    y = tiny_input.flip(-1)
    out = model(tiny_input, y)
    assert out.z_x.shape == out.z_y.shape == (1, 8, tiny_config.projector_dim)  # 2^3 deepest tokens
    enc = list(model.swinViT.parameters())
    # the y branch alone reaches projector_y, never the encoder
    grads = torch.autograd.grad((out.z_y ** 2).mean(), enc + list(model.projector_y.parameters()),
                                allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads[:len(enc)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(enc):])
    _loss(out, torch.Generator().manual_seed(0)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_ema_target_gets_no_gradient_and_update_target_moves_it(tiny_config, tiny_input):
    torch.manual_seed(4)
    cfg = dataclasses.replace(tiny_config, target_momentum=0.9)
    model = GMIMForPretraining(cfg).train()
    assert model.target_swinViT is not None
    _loss(model(tiny_input, tiny_input.flip(-1)), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in model.target_swinViT.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.swinViT.parameters())
    before = [p.detach().clone() for p in model.target_swinViT.parameters()]
    with torch.no_grad():
        for p in model.swinViT.parameters():
            p.add_(1.0)
    model.update_target()
    for b, t, o in zip(before, model.target_swinViT.parameters(), model.swinViT.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not torch.equal(t, b)


@pytest.fixture(scope="module")
def segmenter(tiny_config):
    return GMIMForSegmentation(tiny_config).eval()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 2, 64, 64, 64), "expected input (B, 1, D, H, W), got (1, 2, 64, 64, 64)"),
        ((1, 64, 64, 64), "expected input (B, 1, D, H, W), got (1, 64, 64, 64)"),
        ((1, 1, 64, 64, 48), "spatial size (64, 64, 48) must be divisible by 32"),
    ],
)
def test_segmenter_rejects_bad_input_shapes(segmenter, shape, message):
    with pytest.raises(InputError) as err:
        segmenter(torch.zeros(shape))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("module", "old", "network", "public"),
    [
        ("gmim_hub.models", "GMIMModel", "PretrainingNetwork", "GMIMForPretraining"),
        ("gmim_hub.models.pretraining", "GMIMModel", "PretrainingNetwork", "GMIMForPretraining"),
        ("gmim_hub.models", "GMIMSegmenter", "SegmentationNetwork", "GMIMForSegmentation"),
        ("gmim_hub.models.segmentation", "GMIMSegmenter", "SegmentationNetwork", "GMIMForSegmentation"),
    ],
)
def test_old_network_names_still_work_with_a_deprecation_warning(module, old, network, public):
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated .* use gmim_hub\.{public} "):
        cls = getattr(importlib.import_module(module), old)
    assert cls is getattr(gmim_hub.models, network)
    assert issubclass(getattr(gmim_hub, public), cls)
    with pytest.raises(AttributeError, match="has no attribute 'GMIMNothing'"):
        importlib.import_module(module).GMIMNothing  # noqa: B018 - the attribute access is the test


def test_old_import_path_of_the_public_classes_still_works():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from gmim_hub.models.hub_models import GMIMForPretraining as OldPretraining
        from gmim_hub.models.hub_models import GMIMForSegmentation as OldSegmentation
    assert OldPretraining is GMIMForPretraining and OldSegmentation is GMIMForSegmentation


def _gmim_imports(path: Path) -> list[str]:
    """Every gmim_hub module `path` imports, at any depth (functions and TYPE_CHECKING blocks included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gmim_hub"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("gmim_hub")]
    return names


def test_the_hub_layer_sits_above_the_networks():
    """gmim_hub.hub builds on gmim_hub.models, never the reverse (models/hub_models.py, the old import path of the
    public classes, is the one exception), and nothing in either imports the other inside a function."""
    package = ROOT / "models"
    upward = {p.name: [m for m in _gmim_imports(p) if m.startswith("gmim_hub.hub")] for p in package.glob("*.py")}
    assert {name: found for name, found in upward.items() if found} == {
        "hub_models.py": ["gmim_hub.hub.pretrained"]}
    for path in [*package.glob("*.py"), *(ROOT / "hub").glob("*.py")]:
        tree = ast.parse(path.read_text())
        deferred = [node.lineno for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                    for node in ast.walk(fn) if isinstance(node, ast.Import | ast.ImportFrom)]
        assert deferred == [], f"{path} imports inside a function at lines {deferred}"
