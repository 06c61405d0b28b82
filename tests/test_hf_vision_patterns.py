"""Patterns of Hugging Face vision models that the first HF sweep verified WRONG (analysis exact, shrunk model
differing from the masked one): mode-dependent randomness that torch.export baked into the graph."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptgraph
from ptgraph.export import export
from ptgraph.passes.groups import analyze_channels
from ptgraph.passes.verify import exercise_zero_params, flat_output, verify


class InplaceDropoutHead(nn.Module):
    """A CNN whose classifier drops in place, as HF MobileNetV1/V2 and MobileViT do (`nn.Dropout(p, inplace=True)`):
    exported as aten.dropout_, which kept dropping in eval (rel err 1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.drop = nn.Dropout(0.9, inplace=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.dw(F.relu6(self.bn(self.conv(x)))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def hf_drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """HF's drop_path (swinv2, cvt, focalnet, convnext, ...), verbatim in its arithmetic."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    mask.floor_()
    return x.div(keep) * mask


def timm_drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's drop_path: a Bernoulli draw on a fresh tensor, scaled in place."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    mask.div_(keep)
    return x * mask


class DropPathBlock(nn.Module):
    """A residual MLP with stochastic depth written out in Python (`if not self.training: return x`), which
    torch.export resolves in train mode: the random mask stayed in eval (swinv2 0.86, cvt 0.51, focalnet 0.14)."""

    def __init__(self, drop_path, p: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)
        self.drop_path, self.p = drop_path, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm(x)))), self.p, self.training)
        return self.head(x)


def _verified(model: nn.Module, inputs: tuple, capture: str = "auto"):
    graph = ptgraph.trace(model, inputs, capture=capture)
    analysis = analyze_channels(graph)
    exercise_zero_params(graph.module)
    return graph, analysis, verify(analysis, inputs)


def _deterministic_in_eval(gm: nn.Module, inputs: tuple) -> bool:
    gm.eval()
    with torch.no_grad():
        return torch.equal(flat_output(gm(*inputs)), flat_output(gm(*inputs)))


def test_inplace_dropout_follows_eval_after_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    graph, analysis, result = _verified(InplaceDropoutHead(), (x,), capture="export")
    assert graph.capture == "export"
    assert result.ok and result.rel_err <= 1e-4, result
    assert _deterministic_in_eval(graph.module, (x,))
    assert any(g.prunable and g.exact and g.size >= 8 for g in analysis.groups)  # the classifier input too
    assert export(graph.module.eval(), (x,), tmp_path / "m.onnx").ok


@pytest.mark.parametrize("drop_path", [hf_drop_path, timm_drop_path], ids=["hf_rand_floor", "timm_bernoulli"])
def test_exported_drop_path_is_identity_in_eval(drop_path, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    model = DropPathBlock(drop_path)
    graph, analysis, result = _verified(model, (x,), capture="export")
    assert result.ok and result.rel_err <= 1e-4, result
    gm = graph.module.eval()
    with torch.no_grad():
        assert _deterministic_in_eval(gm, (x,))
        assert torch.allclose(gm(x), model.eval()(x), atol=1e-6)  # both shrunk: the same parameters
    gm.train()
    with torch.no_grad():
        kept = {bool((gm(x) - model.eval()(x)).abs().max() > 1e-3) for _ in range(8)}
    assert True in kept  # in training the paths are still dropped
    assert export(gm.eval(), (x,), tmp_path / "m.onnx").ok  # the mode gate is ONNX-exportable


tf = pytest.importorskip("transformers")


def _hf_image_model(config: object, size: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = tf.AutoModelForImageClassification.from_config(config)
    return model.train(), (torch.randn(1, 3, size, size),)


@pytest.mark.parametrize("name", ["mobilenet_v1", "swinv2"])
def test_hf_models_with_inplace_dropout_or_drop_path_verify(name):
    if name == "mobilenet_v1":
        config = tf.MobileNetV1Config(image_size=64, depth_multiplier=0.25, num_labels=3)  # classifier dropout 0.999
    else:
        config = tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                 window_size=4, drop_path_rate=0.3, num_labels=3)
    model, inputs = _hf_image_model(config, 64 if name == "mobilenet_v1" else 32)
    graph, _, result = _verified(model, inputs)
    assert graph.capture == "export"
    assert result.ok and result.rel_err <= 1e-4, result
    assert _deterministic_in_eval(graph.module, inputs)
