"""Hypothesis strategies: small random CNNs built from the patterns a channel pruner must get right.

`architectures()` draws an `Arch`: a plain, printable spec (nested tuples) plus a seed, so a
failing example reads as the model it built. `Arch.build()` turns it into an nn.Module in
float64. The pieces, nested up to a few levels deep:

- conv (k 1 or 3, optional stride 2, bias, BatchNorm, activation), depthwise conv (groups=C,
  multiplier 1 or 2), grouped conv (groups 2 or 4), max/avg pooling, standalone BN + activation
- residual add, with and without a 1x1 projection on the shortcut, optional post-activation
- DenseNet-style concatenation cat([x, f(x)]) and multi-branch concatenation
- split (torch.split with sections or a size, chunk, x[:, a:b] slices with positive or
  negative bounds, narrow), each piece
  processed, and the pieces re-concatenated in a random order
- squeeze-excitation gating with convs or linears (and several ways back to N,C,1,1)
- ShuffleNet channel shuffle (view/transpose/view, sizes read at run time or literal), and the
  ShuffleNetV2 unit (chunk, process half, cat, shuffle)
- heads: none (conv features are the output), pool/mean -> linear, an MLP, flatten(C,H,W) ->
  linear (torch.flatten or nn.Flatten), view(N, -1) -> linear

Activations come as modules (nn.ReLU, nn.SiLU, nn.GELU) and as functions (F.relu, F.silu, F.gelu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

IN_CHANNELS, HW, BATCH, CLASSES = 3, 8, 2, 5
MAX_C = 24  # a block that would leave more channels than this is followed by a narrowing conv
ACTS = ("relu", "none", "silu", "gelu", "F.relu", "F.silu", "F.gelu")

# ---------------------------------------------------------------------------------------------
# modules the specs build
# ---------------------------------------------------------------------------------------------


class Fn(nn.Module):
    """A functional activation (traced as call_function)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "F.relu":
            return F.relu(x)
        if self.name == "F.silu":
            return F.silu(x)
        return F.gelu(x)


def make_act(name: str) -> nn.Module | None:
    if name == "none":
        return None
    if name.startswith("F."):
        return Fn(name)
    return {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[name]()


def conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int, bias: bool, bn: bool, act: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    a = make_act(act)
    if a is not None:
        layers.append(a)
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, proj: nn.Module | None, post: nn.Module | None, shortcut_first: bool) -> None:
        super().__init__()
        self.body, self.proj, self.post, self.shortcut_first = body, proj, post, shortcut_first

    def forward(self, x):
        y = self.body(x)
        s = self.proj(x) if self.proj is not None else x
        out = s + y if self.shortcut_first else y + s
        return self.post(out) if self.post is not None else out


class Dense(nn.Module):
    """DenseNet: the input and the new features, concatenated."""

    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body, self.dim = body, dim

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=self.dim)


class Branches(nn.Module):
    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class SplitCat(nn.Module):
    """Split the channels into pieces, process each piece, concatenate the results in `order`."""

    def __init__(self, how: str, arg: object, c: int, bodies: list[nn.Module], order: tuple[int, ...]) -> None:
        super().__init__()
        self.how, self.arg, self.bodies, self.order = how, arg, nn.ModuleList(bodies), order
        self.bounds = piece_bounds(how, arg, c)

    def forward(self, x):
        if self.how == "split_list":
            parts = torch.split(x, list(self.arg), dim=-3)
        elif self.how == "split_int":
            parts = x.split(self.arg, 1)
        elif self.how == "chunk":
            parts = torch.chunk(x, self.arg, 1)
        elif self.how == "slice":
            parts = [x[:, a:b] for a, b in self.bounds]
        elif self.how == "slice_neg":  # the same pieces, counted from the end
            c = self.bounds[-1][1]
            parts = [x[:, (a - c if a else None):(b - c if b < c else None)] for a, b in self.bounds]
        else:  # narrow
            parts = [x.narrow(1, a, b - a) for a, b in self.bounds]
        outs = [self.bodies[i](parts[i]) for i in range(len(self.bounds))]
        return torch.cat([outs[i] for i in self.order], dim=1)


def piece_bounds(how: str, arg: object, c: int) -> list[tuple[int, int]]:
    """The channel ranges each way of splitting produces (computed by torch itself)."""
    x = torch.arange(c).view(1, c)
    if how == "split_list":
        parts = torch.split(x, list(arg), 1)
    elif how == "split_int":
        parts = torch.split(x, arg, 1)
    elif how == "chunk":
        parts = torch.chunk(x, arg, 1)
    else:  # cut points
        cuts = [0, *arg, c]
        return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]
    return [(int(p[0, 0]), int(p[0, -1]) + 1) for p in parts]


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int, linear: bool, pool: str, back: str, act: str, gate: str) -> None:
        super().__init__()
        self.c, self.linear, self.pool_kind, self.back, self.gate = c, linear, pool, back, gate
        self.pool = nn.AdaptiveAvgPool2d(1)
        layer = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.fc1, self.fc2 = layer(c, hidden), layer(hidden, c)
        self.act = make_act(act) or nn.Identity()

    def forward(self, x):
        if self.pool_kind == "adaptive":
            s = self.pool(x)
            if self.linear:
                s = torch.flatten(s, 1)
        else:
            s = x.mean((2, 3), keepdim=not self.linear)
        s = self.fc2(self.act(self.fc1(s)))
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        if self.linear:
            if self.back == "view_size":
                s = s.view(s.size(0), -1, 1, 1)
            elif self.back == "reshape_literal":
                s = s.reshape(-1, self.c, 1, 1)
            elif self.back == "index_none":
                s = s[:, :, None, None]
            else:
                s = s.unsqueeze(-1).unsqueeze(-1)
        return x * s


class Shuffle(nn.Module):
    """ShuffleNet channel shuffle, with sizes read at run time (torchvision) or written as literals."""

    def __init__(self, groups: int, how: str, c: int, hw: int) -> None:
        super().__init__()
        self.groups, self.how, self.c, self.hw = groups, how, c, hw

    def forward(self, x):
        if self.how == "shape":
            b, c, h, w = x.size()
            x = x.view(b, self.groups, c // self.groups, h, w)
            x = torch.transpose(x, 1, 2).contiguous()
            return x.view(b, -1, h, w)
        x = x.view(-1, self.groups, self.c // self.groups, self.hw, self.hw)
        x = x.transpose(1, 2).contiguous()
        return x.view(-1, self.c, self.hw, self.hw)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 basic unit: half the channels pass, the other half is processed, then shuffle."""

    def __init__(self, body: nn.Module, c: int, hw: int) -> None:
        super().__init__()
        self.body, self.shuffle = body, Shuffle(2, "shape", c, hw)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return self.shuffle(torch.cat((x1, self.body(x2)), dim=1))


class Head(nn.Module):
    def __init__(self, kind: str, c: int, hw: int, hidden: int, act: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "none":
            return
        self.pool = nn.AdaptiveAvgPool2d(1)
        features = c * hw * hw if kind in ("flatten_linear", "view_linear", "module_flatten") else c
        self.flatten = nn.Flatten()
        if kind == "mlp":
            self.fc = nn.Sequential(nn.Linear(features, hidden), make_act(act) or nn.Identity(), nn.Linear(hidden, CLASSES))
        else:
            self.fc = nn.Linear(features, CLASSES)

    def forward(self, x):
        if self.kind == "none":
            return x
        if self.kind in ("pool_linear", "mlp"):
            x = self.pool(x).flatten(1)
        elif self.kind == "mean_linear":
            x = x.mean((2, 3))
        elif self.kind == "flatten_linear":
            x = torch.flatten(x, 1)
        elif self.kind == "module_flatten":
            x = self.flatten(x)
        else:  # view_linear
            x = x.view(x.size(0), -1)
        return self.fc(x)


class Net(nn.Module):
    def __init__(self, stem: nn.Module, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stem, self.body, self.head = stem, body, head

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


# ---------------------------------------------------------------------------------------------
# specs -> modules
# ---------------------------------------------------------------------------------------------


def build_seq(specs: tuple, c: int, hw: int) -> tuple[nn.Module, int, int]:
    blocks = []
    for spec in specs:
        m, c, hw = build_block(spec, c, hw)
        blocks.append(m)
    return nn.Sequential(*blocks), c, hw


def build_block(spec: tuple, c: int, hw: int) -> tuple[nn.Module, int, int]:
    kind = spec[0]
    if kind == "conv":
        _, cout, k, stride, bias, bn, act = spec
        return conv_bn_act(c, cout, k, stride, 1, bias, bn, act), cout, (hw + stride - 1) // stride
    if kind == "grouped":
        _, groups, cout, k, bias, bn, act = spec
        return conv_bn_act(c, cout, k, 1, groups, bias, bn, act), cout, hw
    if kind == "dw":
        _, mult, k, bias, bn, act = spec
        return conv_bn_act(c, c * mult, k, 1, c, bias, bn, act), c * mult, hw
    if kind == "pool":
        return (nn.MaxPool2d(2) if spec[1] == "max" else nn.AvgPool2d(2)), c, hw // 2
    if kind == "bn_act":
        a = make_act(spec[1])
        return nn.Sequential(nn.BatchNorm2d(c), *([a] if a is not None else [])), c, hw
    if kind == "res":
        _, body_spec, proj, post, shortcut_first = spec
        body, cout, _ = build_seq(body_spec, c, hw)
        p = conv_bn_act(c, cout, 1, 1, 1, proj[0], proj[1], "none") if proj is not None else None
        return Residual(body, p, make_act(post), shortcut_first), cout, hw
    if kind == "dense":
        _, body_spec, dim = spec
        body, grown, _ = build_seq(body_spec, c, hw)
        return Dense(body, dim), c + grown, hw
    if kind == "branches":
        built = [build_seq(b, c, hw) for b in spec[1]]
        return Branches([b for b, _, _ in built]), sum(cb for _, cb, _ in built), hw
    if kind == "split":
        _, how, arg, body_specs, order = spec
        bounds = piece_bounds(how, arg, c)
        built = [build_seq(b, hi - lo, hw) for b, (lo, hi) in zip(body_specs, bounds)]
        return SplitCat(how, arg, c, [b for b, _, _ in built], order), sum(cb for _, cb, _ in built), hw
    if kind == "se":
        _, hidden, linear, pool, back, act, gate = spec
        return SqueezeExcite(c, hidden, linear, pool, back, act, gate), c, hw
    if kind == "shuffle":
        return Shuffle(spec[1], spec[2], c, hw), c, hw
    if kind == "shuffle_unit":
        body, _, _ = build_seq(spec[1], c // 2, hw)
        return ShuffleUnit(body, c, hw), c, hw
    raise ValueError(spec)


@dataclass(frozen=True)
class Arch:
    stem: tuple  # (channels, k, bn, act)
    body: tuple  # block specs
    head: tuple  # (kind, hidden, act)
    seed: int

    def build(self) -> nn.Module:
        """The model in float64 and train mode, with random weights and BatchNorm statistics."""
        torch.manual_seed(self.seed)
        c0, k, bn, act = self.stem
        stem = conv_bn_act(IN_CHANNELS, c0, k, 1, 1, True, bn, act)
        body, c, hw = build_seq(self.body, c0, HW)
        model = Net(stem, body, Head(self.head[0], c, hw, self.head[1], self.head[2])).double()
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.double) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.double) * 0.2)
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.double) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.double) + 0.5)
        return model.train()

    def inputs(self, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + seed)
        return torch.randn(batch, IN_CHANNELS, HW, HW, generator=gen, dtype=torch.double)


# ---------------------------------------------------------------------------------------------
# drawing specs
# ---------------------------------------------------------------------------------------------

acts = st.sampled_from(ACTS)


def _conv(draw, cout: int, stride: int = 1) -> tuple:
    k = draw(st.sampled_from([1, 3]))
    return ("conv", cout, k, stride, draw(st.booleans()), draw(st.booleans()), draw(acts))


def _fit(draw, specs: tuple, c: int, target: int | None, limit: int | None = None) -> tuple[tuple, int]:
    """Append a conv so that the sequence ends with `target` channels (or at most `limit`)."""
    if target is not None and c != target:
        return specs + (_conv(draw, target),), target
    if limit is not None and c > limit:
        cout = draw(st.integers(1, limit))
        return specs + (_conv(draw, cout),), cout
    return specs, c


def _seq(draw, c: int, hw: int, depth: int, down: bool, min_len: int = 0, max_len: int = 3) -> tuple[tuple, int, int]:
    n = draw(st.integers(min_len, max_len))
    specs = []
    for _ in range(n):
        spec, c, hw = _block(draw, c, hw, depth, down)
        specs.append(spec)
    return tuple(specs), c, hw


def _block(draw, c: int, hw: int, depth: int, down: bool) -> tuple[tuple, int, int]:
    if c > MAX_C:  # too wide: narrow it
        cout = draw(st.integers(4, 16))
        return _conv(draw, cout), cout, hw
    if depth > 0 and draw(st.booleans()):  # a block of blocks
        kinds = ["res", "res_proj", "dense", "branches"]
        if c >= 2:
            kinds.append("split")
        if c % 2 == 0:
            kinds.append("shuffle_unit")
    else:
        kinds = ["conv", "dw", "bn_act", "se"]
        if c % 2 == 0:
            kinds += ["grouped", "shuffle"]
        if down and hw >= 4:
            kinds += ["pool", "conv_s2"]
    kind = draw(st.sampled_from(kinds))

    if kind == "conv":
        cout = draw(st.integers(4, 16))
        return _conv(draw, cout), cout, hw
    if kind == "conv_s2":
        cout = draw(st.integers(4, 16))
        return _conv(draw, cout, stride=2), cout, (hw + 1) // 2
    if kind == "dw":
        mult = draw(st.sampled_from([1, 2])) if 2 * c <= MAX_C else 1
        spec = ("dw", mult, draw(st.sampled_from([3, 1])), draw(st.booleans()), draw(st.booleans()), draw(acts))
        return spec, c * mult, hw
    if kind == "bn_act":
        return ("bn_act", draw(acts)), c, hw
    if kind == "se":
        hidden = draw(st.integers(1, max(1, c // 2)))
        linear = draw(st.booleans())
        spec = ("se", hidden, linear, draw(st.sampled_from(["adaptive", "mean"])),
                draw(st.sampled_from(["view_size", "reshape_literal", "index_none", "unsqueeze"])), draw(acts),
                draw(st.sampled_from(["sigmoid", "hardsigmoid"])))
        return spec, c, hw
    if kind == "grouped":
        groups = draw(st.sampled_from([g for g in (2, 4) if c % g == 0]))
        cout = groups * draw(st.integers(1, 16 // groups))
        return ("grouped", groups, cout, draw(st.sampled_from([3, 1])), draw(st.booleans()), draw(st.booleans()),
                draw(acts)), cout, hw
    if kind == "shuffle":
        groups = draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0 and g < c] or [1]))
        return ("shuffle", groups, draw(st.sampled_from(["shape", "literal"]))), c, hw
    if kind == "pool":
        return ("pool", draw(st.sampled_from(["max", "avg"]))), c, hw // 2
    if kind == "res":
        body, cb, _ = _seq(draw, c, hw, depth - 1, False, min_len=1)
        body, _ = _fit(draw, body, cb, c)
        return ("res", body, None, draw(acts), draw(st.booleans())), c, hw
    if kind == "res_proj":
        cout = draw(st.integers(4, 16))
        body, cb, _ = _seq(draw, c, hw, depth - 1, False, min_len=1)
        body, _ = _fit(draw, body, cb, cout)
        proj = (draw(st.booleans()), draw(st.booleans()))  # bias, bn
        return ("res", body, proj, draw(acts), draw(st.booleans())), cout, hw
    if kind == "dense":
        body, cb, _ = _seq(draw, c, hw, depth - 1, False, min_len=1)
        body, cb = _fit(draw, body, cb, None, limit=max(2, MAX_C - c))
        return ("dense", body, draw(st.sampled_from([1, -3]))), c + cb, hw
    if kind == "branches":
        n = draw(st.integers(2, 3))
        branches, total = [], 0
        for _ in range(n):
            b, cb, _ = _seq(draw, c, hw, depth - 1, False)
            b, cb = _fit(draw, b, cb, None, limit=MAX_C // n)
            branches.append(b)
            total += cb
        return ("branches", tuple(branches)), total, hw
    if kind == "split":
        how = draw(st.sampled_from(["split_list", "chunk", "slice", "split_int", "narrow", "slice_neg"]))
        if how in ("split_list", "slice", "narrow", "slice_neg"):
            cuts = sorted(draw(st.sets(st.integers(1, c - 1), min_size=1, max_size=min(3, c - 1))))
            arg = tuple(b - a for a, b in zip([0, *cuts], [*cuts, c])) if how == "split_list" else tuple(cuts)
        elif how == "chunk":
            arg = draw(st.integers(2, min(4, c)))
        else:
            arg = draw(st.integers(1, c - 1))
        bounds = piece_bounds(how, arg, c)
        bodies, total = [], 0
        for lo, hi in bounds:
            b, cb, _ = _seq(draw, hi - lo, hw, depth - 1, False, max_len=2)
            b, cb = _fit(draw, b, cb, None, limit=max(hi - lo, 8))
            bodies.append(b)
            total += cb
        order = tuple(draw(st.permutations(range(len(bounds)))))
        return ("split", how, arg, tuple(bodies), order), total, hw
    if kind == "shuffle_unit":
        body, cb, _ = _seq(draw, c // 2, hw, depth - 1, False, min_len=1)
        body, _ = _fit(draw, body, cb, c // 2)
        return ("shuffle_unit", body), c, hw
    raise AssertionError(kind)


@st.composite
def architectures(draw, max_depth: int = 2) -> Arch:
    """A random small CNN (input BATCH x 3 x 8 x 8), as a printable spec."""
    c0 = draw(st.integers(4, 16))
    stem = (c0, draw(st.sampled_from([3, 1])), draw(st.booleans()), draw(acts))
    body, c, hw = _seq(draw, c0, HW, max_depth, True, min_len=1, max_len=4)
    head_kind = draw(st.sampled_from(["pool_linear", "none", "mean_linear", "mlp", "flatten_linear", "view_linear",
                                         "module_flatten"]))
    head = (head_kind, draw(st.integers(2, 8)), draw(acts))
    return Arch(stem, body, head, draw(st.integers(0, 2**16)))
