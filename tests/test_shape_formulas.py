"""Shape formulas equal the ops they stand for: same shape and dtype as the op run on meta tensors, and
None (the op decides, and raises) wherever the op would refuse the input."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptgraph
from ptgraph.shape_formulas import FUNCTIONS, METHODS, module_formula
from ptgraph.shapes import _Walk, propagate_shapes


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _real(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the op refuses the input
        return None


def _same(got, want):
    if isinstance(want, tuple):
        return isinstance(got, tuple) and len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if want is None:
        return got is None
    return tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype


def _module_on_meta(m, *args, **kwargs):
    m = m.eval()
    params = {k: v.to("meta") for k, v in (*m.named_parameters(), *m.named_buffers())}
    return _real(torch.func.functional_call, m, params, args, kwargs)


MODULE_CASES = [
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), (meta(2, 3, 17, 16),)),
    (nn.Conv2d(4, 8, 3, padding="same", groups=2, dilation=2), (meta(1, 4, 9, 9),)),
    (nn.Conv2d(4, 8, 3, padding="valid"), (meta(1, 4, 9, 9),)),
    (nn.Conv1d(4, 6, 5, stride=3), (meta(2, 4, 20),)),
    (nn.Conv2d(3, 8, 3), (meta(2, 4, 17, 16),)),  # wrong channels: the kernel raises
    (nn.Linear(5, 7), (meta(2, 3, 5),)),
    (nn.Linear(5, 7), (meta(2, 3, 4),)),
    (nn.MaxPool2d(3, 2, 1), (meta(1, 8, 15, 15),)),
    (nn.MaxPool2d(3, 2, 1, ceil_mode=True), (meta(1, 8, 16, 16),)),
    (nn.MaxPool2d(2, dilation=2), (meta(1, 8, 9, 9),)),
    (nn.MaxPool2d(3, padding=2), (meta(1, 8, 9, 9),)),  # padding over half the kernel
    (nn.AvgPool2d(2, 2), (meta(1, 8, 7, 9),)),
    (nn.AvgPool2d(3, 1, 1, count_include_pad=False), (meta(2, 4, 5, 5),)),
    (nn.AvgPool1d(3, 2), (meta(2, 4, 11),)),
    (nn.MaxPool2d(5), (meta(1, 8, 3, 3),)),  # output too small
    (nn.AdaptiveAvgPool2d(1), (meta(2, 8, 7, 7),)),
    (nn.AdaptiveAvgPool2d((3, None)), (meta(2, 8, 7, 5),)),
    (nn.AdaptiveMaxPool2d(2), (meta(1, 8, 7, 7),)),
    (nn.AdaptiveAvgPool1d(4), (meta(2, 8, 9),)),
    (nn.BatchNorm2d(8), (meta(2, 8, 4, 4),)),
    (nn.LayerNorm(8), (meta(2, 4, 8),)),
    (nn.ReLU(inplace=True), (meta(2, 8, 4, 4),)),
    (nn.LeakyReLU(0.1), (meta(2, 8),)),
    (nn.Dropout2d(0.3), (meta(2, 8, 4, 4),)),
    (nn.MultiheadAttention(16, 4, batch_first=True), (meta(2, 5, 16), meta(2, 7, 16), meta(2, 7, 16))),
    (nn.MultiheadAttention(16, 4), (meta(5, 2, 16), meta(7, 2, 16), meta(7, 2, 16))),
    (nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=True), (meta(2, 5, 16), meta(2, 7, 6), meta(2, 7, 10))),
    (nn.MultiheadAttention(16, 4, batch_first=True), (meta(2, 5, 16), meta(2, 7, 16), meta(2, 6, 16))),
]


@pytest.mark.parametrize("m,args", MODULE_CASES, ids=[f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(MODULE_CASES)])
def test_module_formula_matches_meta_kernel(m, args):
    kwargs = {"need_weights": False} if isinstance(m, nn.MultiheadAttention) else {}
    got = module_formula(m)(m, *args, **kwargs)
    want = _module_on_meta(m, *args, **kwargs)
    if want is None:
        assert got is None
    elif got is not None:
        assert _same(got, want)


FUNCTION_CASES = [
    (operator.add, (meta(2, 8, 4, 4), meta(8, 1, 1))),
    (operator.mul, (meta(2, 8, 4, 4), meta(2, 8, 1, 1, dtype=torch.float64))),
    (operator.truediv, (meta(3, dtype=torch.int64), meta(3, dtype=torch.int64))),
    (torch.sub, (meta(2, 3), meta(4, 3))),  # does not broadcast
    (torch.cat, ([meta(1, 4, 5, 5), meta(1, 2, 5, 5)], 1)),
    (torch.cat, ([meta(1, 4, 5), meta(1, 4, 2)], -1)),
    (torch.cat, ([meta(1, 4, 5), meta(2, 4, 5)], 1)),
    (F.relu, (meta(2, 8, 3).permute(2, 0, 1),)),
    (F.gelu, (meta(2, 8),)),
    (F.layer_norm, (meta(2, 5, 8).transpose(0, 1), (8,), meta(8), meta(8))),
    (F.layer_norm, (meta(2, 5, 8), (5, 8))),
    (F.layer_norm, (meta(2, 5, 8), (4,))),
    (F.adaptive_avg_pool2d, (meta(1, 8, 6, 6), (2, 3))),
]


@pytest.mark.parametrize("fn,args", FUNCTION_CASES, ids=[f"{getattr(f, '__name__', f)}-{i}" for i, (f, _) in enumerate(FUNCTION_CASES)])
def test_function_formula_matches_meta_kernel(fn, args):
    got = FUNCTIONS[fn](None, *args)
    want = _real(fn, *args)
    if want is None:
        assert got is None
    elif got is not None:
        assert _same(got, want)


def test_method_formulas():
    x, y = meta(2, 8, 4, 4), meta(1, 8, 1, 1)
    assert _same(METHODS["mul"](None, x, y), x.mul(y))
    assert _same(METHODS["sigmoid"](None, x), x.sigmoid())
    assert METHODS["add"](None, x, y, alpha=2) is None  # an argument the formula does not model


class _ReadsValues(nn.Module):
    def forward(self, x):
        return x[:, : int(x.abs().sum() > -1) + 1]  # needs values: no meta kernel for .item()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.leaf = _ReadsValues()

    def forward(self, x):
        return self.leaf(self.bn(self.conv(x)))


def test_leaf_reading_values_falls_back_to_a_real_run_and_restores_the_mode():
    model = _Net().train()
    graph = ptgraph.trace(model, (torch.randn(1, 3, 8, 8),), leaf_modules=[_ReadsValues])
    shapes = {n.name: n.meta["shape"] for n in graph.module.graph.nodes}
    assert shapes["leaf"] == (1, 2, 6, 6)
    assert all(m.training for m in graph.module.modules())
    propagate_shapes(graph.module.eval(), (torch.randn(1, 3, 8, 8),))
    assert not any(m.training for m in graph.module.modules())


def test_meta_walk_equals_real_walk_on_a_torchvision_model():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v3_small(num_classes=10).train()
    x = torch.randn(1, 3, 64, 64)
    gm = ptgraph.trace(model, (x,)).module
    fast = {n: (n.meta["shape"], n.meta.get("dtype")) for n in gm.graph.nodes}
    walk = _Walk(gm, meta=False)
    with torch.no_grad():
        walk.run((x,))
    walk.restore()
    assert fast == {n: (n.meta["shape"], n.meta.get("dtype")) for n in gm.graph.nodes}
    assert all(m.training for m in gm.modules())


def _fit_window(window: list[int], size: list[int]) -> list[int]:
    """Edits its list argument in place, as torchvision's swin3d `_get_window_and_shift_size` does."""
    for i in range(len(window)):
        window[i] = min(window[i], size[i])
    return window


torch.fx.wrap("_fit_window")


class WindowPool(nn.Module):
    """A wrapped call that gets a list constant and a list of traced sizes, then pools by the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.window = [4, 16]

    def forward(self, x):
        x = self.conv(x)
        k = _fit_window(self.window, [x.shape[2], x.shape[3]])
        return F.avg_pool2d(x, kernel_size=(k[0], k[1]))


def test_shapes_pass_fresh_mutable_lists_to_wrapped_functions():
    x = torch.randn(1, 3, 8, 8)
    graph = ptgraph.trace(WindowPool(), (x,))
    out = [n for n in graph.module.graph.nodes if n.op == "output"][0]
    assert out.args[0].meta["shape"] == (1, 8, 2, 1)
    eager = WindowPool()
    eager.load_state_dict(graph.module.state_dict())
    assert torch.allclose(graph.module(x), eager(x))
