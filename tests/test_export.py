"""ONNX export of shrunk models: onnxruntime matches PyTorch, weights have the pruned shapes, the graph is clean."""
import copy

import pytest
import torch
import torchvision

import ptgraph
from ptgraph.cli import main
from ptgraph.errors import UserError
from ptgraph.export import conv_weight_shapes, export, initializer_shapes
from ptgraph.passes import analyze_channels, random_plan, shrink
from ptgraph.trainers.config import TrainConfig
from ptgraph.trainers.loop import train

JUGGLING = ("Identity", "Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Reshape", "Constant", "ConstantOfShape",
            "Cast", "Expand", "Range")
SUBSET = ["resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5"]


def _pruned(model, x, ratio=0.3):
    graph = ptgraph.trace(model, (x,))
    analysis = analyze_channels(graph)
    shrink(analysis, random_plan(analysis.groups, ratio, 0))
    return graph.module.eval()


@pytest.mark.parametrize("name", SUBSET)
def test_torchvision_subset_exports_pruned(tmp_path, name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    plain = export(copy.deepcopy(model).eval(), (x,), tmp_path / "plain.onnx")
    gm = _pruned(model, x)
    result = export(gm, (x,), tmp_path / "pruned.onnx")
    assert result.ok, result
    assert result.rel_err <= 1e-4
    dense_shapes = conv_weight_shapes(tmp_path / "plain.onnx")
    pruned_shapes = conv_weight_shapes(tmp_path / "pruned.onnx")
    assert len(dense_shapes) == len(pruned_shapes)
    smaller = sum(p[0] < d[0] for p, d in zip(pruned_shapes, dense_shapes))
    assert smaller >= len(dense_shapes) // 2  # most layers really are narrower in the file
    torch_shapes = [tuple(m.weight.shape) for m in gm.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(pruned_shapes) == sorted(torch_shapes)
    # clean: no more identity or shape-juggling ops than a plain export of the eager model, the same convs
    for op in JUGGLING:
        assert result.op_counts.get(op, 0) <= plain.op_counts.get(op, 0), (op, result.op_counts, plain.op_counts)
    for op in ("Conv", "Gemm", "MatMul", "Concat"):
        assert result.op_counts.get(op, 0) == plain.op_counts.get(op, 0), op


def test_aux_heads_dropped_for_export_as_in_eval_mode(tmp_path):
    """GoogLeNet is traced in training mode, aux heads and all; the export is the eval-mode model."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10)
    x = torch.randn(1, 3, 96, 96)
    gm = _pruned(model.train(), x).train()
    assert type(gm(x)).__name__ == "GoogLeNetOutputs"  # the training graph still returns the aux logits
    result = export(gm, (x,), tmp_path / "g.onnx")
    assert result.ok, result
    assert result.params < sum(p.numel() for p in gm.parameters())  # the aux heads' weights are not in the file
    assert gm.training and type(gm(x)).__name__ == "GoogLeNetOutputs"  # the trained module is left as it was


def test_dynamic_batch_export(tmp_path):
    gm = _pruned(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))
    result = export(gm, (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx", dynamic_batch=True, check_batch=5)
    assert result.ok


def test_forward_with_optional_parameters_exports_under_its_own_names(tmp_path):
    """timm's ViT takes `attn_mask=None, is_causal=False` beside the image; the traced graph keeps them as
    placeholders, which the TorchScript exporter used to feed as traced tensors (and then fall back to the
    dynamo exporter, which needs onnxscript)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = _pruned(model, x)
    result = export(gm, (x,), tmp_path / "vit.onnx", dynamic_batch=True)
    assert result.ok and result.exporter == "torchscript", result
    names = set(initializer_shapes(tmp_path / "vit.onnx"))
    assert "patch_embed.proj.weight" in names and not any(n.startswith("_model") for n in names)


def test_export_cli_from_run_and_spec(tmp_path, capsys):
    cfg = TrainConfig(model="toy_models:small_resnet", data="synthetic", epochs=1, batch_size=16, steps_per_epoch=4,
                      reconfig_steps=2, penalty_ratio=0.5, threshold=2.1, run_dir=str(tmp_path / "run"),
                      tensorboard=False)
    summary = train(cfg)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "run.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime OK" in out and f"{summary['params']:,} parameters" in out
    assert main(["export", "--model", "ptgraph:resnet20", "--out", str(tmp_path / "r20.onnx")]) == 0
    assert "onnxruntime OK" in capsys.readouterr().out


class CustomOp(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x[0, 0, :2, :2]).real.sum() + x  # no ONNX symbolic


@pytest.mark.parametrize("argv, words", [
    (["/no/such/run", "--out", "x.onnx"], "no checkpoint at"),
    (["--model", "ptgraph:resnet20", "--out", "/no/such/dir/m.onnx"], "does not exist or is not writable"),
    (["--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8", "--out", "{tmp}/m.onnx", "--opset", "3"],
     "opset 3"),
])
def test_export_bad_input(capsys, tmp_path, argv, words):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_export_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_unexportable_op_is_named(tmp_path):
    with pytest.raises(UserError, match="opset 17"):
        export(CustomOp().eval(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")


class IntegerRelu(torch.nn.Module):
    """Valid ONNX that onnxruntime cannot run: it has no CPU kernel for Relu on int16."""

    def forward(self, x):
        return torch.relu(x.to(torch.int16)).float()


def test_model_onnxruntime_cannot_run_is_one_clear_error(tmp_path):
    # torchvision's MViT exports to a graph onnxruntime fails on; that must be a refusal, not a crash
    with pytest.raises(UserError, match="onnxruntime cannot run the model exported at opset 17"):
        export(IntegerRelu().eval(), (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx")


class TensorConstant(torch.nn.Module):
    """`torch.tensor(...)` in a forward: torch.export captures it as aten.lift_fresh_copy, which ONNX lacks (RAFT)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) * torch.tensor([2.0, 0.5]).sum()


def test_tensor_constant_of_an_exported_graph_exports_to_onnx(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    graph = ptgraph.trace(TensorConstant(), (x,), capture="export")
    result = export(graph.module, (x,), tmp_path / "m.onnx")
    assert result.ok, result


from hypothesis import HealthCheck, given, settings  # noqa: E402

from strategies import architectures  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=architectures())
def test_random_architectures_export_after_shrink(tmp_path, arch):
    model = arch.build().float()
    x = arch.inputs().float()
    graph = ptgraph.trace(model, (x,))
    analysis = analyze_channels(graph)
    from ptgraph.passes import keep_every_tensor

    shrink(analysis, keep_every_tensor(analysis, random_plan(analysis.groups, 0.3, 0)))
    result = export(graph.module.eval(), (x,), tmp_path / "arch.onnx")
    assert result.ok, (arch, result)


class SliceWrites(torch.nn.Module):
    """A mask built by writing into slices of an intermediate tensor, as torchvision's Swin builds its
    shifted-window mask: torch.export keeps the in-place writes, which the TorchScript exporter drops."""

    def __init__(self, step: int = 3) -> None:
        super().__init__()
        self.conv, self.step = torch.nn.Conv2d(3, 4, 1), step

    def forward(self, x):
        y = self.conv(x)
        mask = y.new_zeros(y.shape[-2:])
        count = 0
        for h in (slice(0, -self.step), slice(-self.step, None)):
            for w in (slice(0, 2), slice(2, -1), slice(-1, None)):
                mask[h, w] = count
                count += 1
        mask[1:3, 1:3] += 0.5
        mask[0:1, 0:1].fill_(-1.0)  # fill_ with a Python number
        mask[-1:, 1:2].zero_()
        mask[:, 0:1].copy_(y[0, 0, :, 0:1])
        return y * mask


@pytest.mark.parametrize("step", [1, 3])
def test_writes_into_slices_of_an_intermediate_export_to_onnx(tmp_path, step):
    from ptgraph.onnx_functional import functional_slice_writes

    x = torch.randn(2, 3, 6, 7)
    graph = ptgraph.trace(SliceWrites(step), (x,), capture="export")
    written = functional_slice_writes(graph.module)
    assert written is not graph.module  # there were writes to rewrite
    with torch.no_grad():
        torch.testing.assert_close(written(x), graph.module(x), rtol=0, atol=0)
    result = export(graph.module, (x,), tmp_path / "m.onnx")
    assert result.ok, result
