"""Patterns from public libraries that used to freeze far more than they need (issue 30), one small
hand-written model each: the stream is prunable, a random shrink of the exact groups matches the mask
(`verify`, 1e-4), and the shrunk model trains a step."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptgraph
from ptgraph.cli import summary
from ptgraph.passes import analyze_channels
from ptgraph.passes.verify import verify


def group_with(groups, name, axis):
    """The group among `groups` (or an analysis' groups) holding parameter `name` along `axis`, all of it."""
    groups = getattr(groups, "groups", groups)
    found = {g.id: g for g in groups for m in g.members if m.name == name and m.axis == axis}
    assert len(found) == 1, (name, axis, found)
    return next(iter(found.values()))


def check(model, inputs, streams, capture="auto"):
    """Trace, check the named (parameter, axis) groups are prunable and exact, verify a random 30% shrink
    of every exact group against its mask, and train the shrunk model one step. Returns the graph, the
    analysis (shrunk) and its groups before the shrink."""
    torch.manual_seed(0)
    graph = ptgraph.trace(model, inputs, capture=capture)
    analysis = analyze_channels(graph)
    before = analysis.groups
    for name, axis in streams:
        g = group_with(analysis, name, axis)
        assert g.prunable and g.exact, (name, g.reason)
    result = verify(analysis, inputs, ratio=0.3)
    assert result.ok, result
    assert result.params_after < result.params_before
    gm = graph.module.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    out = gm(*inputs)
    loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    return graph, analysis, before


# 1. attention pooling over a CNN through F.multi_head_attention_forward (CLIP's ModifiedResNet head)
class AttentionPool(nn.Module):
    def __init__(self, positions: int, dim: int, heads: int, out: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(positions + 1, dim) / dim ** 0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.pos[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x.squeeze(0)


class PackedSelfAttentionPool(nn.Module):
    """The packed form: one in_proj_weight, self-attention, attention weights asked for."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim ** 0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)
        y, w = F.multi_head_attention_forward(x, x, x, x.shape[-1], self.heads, self.in_proj_weight,
                                              self.in_proj_bias, None, None, False, 0.0, self.out.weight,
                                              self.out.bias, training=self.training)
        return y.mean(0) + w.sum()


class PooledCNN(nn.Module):
    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.down = nn.Conv2d(16, 32, 1, stride=2)
        self.pool = PackedSelfAttentionPool(32, 4) if packed else AttentionPool(16, 32, 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)) + self.down(x))  # the last stage's stream
        return self.pool(x)


@pytest.mark.parametrize("packed", [False, True])
def test_functional_multi_head_attention(packed):
    graph, analysis, before = check(PooledCNN(packed), (torch.randn(2, 3, 8, 8),), [("c2.weight", 0), ("c1.weight", 0)])
    assert graph.capture == "fx" and graph.opened  # decomposed, so the graph module runs the pruned model
    assert not any("multi_head_attention_forward" in (g.reason or "") for g in analysis.groups)
    if not packed:
        heads = group_with(before, "pool.q_proj.weight", 0)
        assert heads.prunable and heads.exact and heads.size == 4  # whole heads


# 2. a windowed block that pads a channels-last map (Swin-style)
class WindowBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, window: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)
        self.heads, self.window = heads, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        B, H, W, C = x.shape
        ws = self.window
        pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
        y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # H and W padded, C not
        Hp, Wp = H + pad_h, W + pad_w
        y = y.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(y).reshape(-1, ws * ws, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, ws * ws, C)
        y = self.proj(y).view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        x = x + y[:, :H, :W, :]
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_pad_of_channels_last_map(capture):
    _, _, before = check(WindowBlock(), (torch.randn(2, 3, 22, 18),), [("stem.weight", 0), ("fc1.weight", 0)],
                        capture)
    assert not any("padded" in (g.reason or "") or "resampled" in (g.reason or "") for g in before)


def test_pad_of_a_padded_channel_axis_freezes_it():
    class PadChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 4, 1)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))  # pads C: 8 -> 10

    analysis = analyze_channels(ptgraph.trace(PadChannels(), (torch.randn(1, 3, 4, 4),)))
    g = group_with(analysis, "a.weight", 0)
    assert not g.prunable and "padded axis" in g.reason


# 3. position-id and relative-index buffers (BERT / Swin style): indices, not channels
class IndexedEncoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, length: int = 12) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.register_buffer("position_ids", torch.arange(64).unsqueeze(0), persistent=False)
        coords = torch.arange(length)
        self.register_buffer("relative_index", (coords[:, None] - coords[None, :] + length - 1))
        self.bias_table = nn.Parameter(torch.randn(2 * length - 1, heads) * 0.02)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.heads, self.length = heads, length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(self.position_ids[:, :self.length])
        bias = self.bias_table[self.relative_index].permute(2, 0, 1)  # (heads, L, L)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        x = x + self.proj(y)
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.lm_head(x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_index_buffers_are_not_channels(capture):
    graph, analysis, before = check(IndexedEncoder(), (torch.randint(0, 50, (2, 12)),),
                            [("tok.weight", 1), ("fc1.weight", 0)], capture)
    buffers = {"position_ids", "relative_index"}
    assert not any(m.name.split(".")[-1] in buffers for g in before for m in g.members)
    frozen = [g for g in before if not g.prunable]
    # what stays frozen: the vocabulary (the model's output) and the bias table's positions
    assert sorted(g.size for g in frozen) == [23, 50], [(g.size, g.reason) for g in frozen]
    assert analysis.removable_channel_fraction > analysis.prunable_channel_fraction
    info = summary(analysis, {"trace": 0.0, "analyze": 0.0})
    assert info["removable_channel_fraction"] == analysis.removable_channel_fraction
    assert 0 < info["prunable_param_fraction"] < 1


def test_removable_share_leaves_out_only_output_groups():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 100)

        def forward(self, x):
            return self.fc(self.b(F.relu(self.a(x))).mean((2, 3)))

    analysis = analyze_channels(ptgraph.trace(Classifier(), (torch.randn(1, 3, 8, 8),)))
    assert analysis.prunable_channel_fraction == pytest.approx(16 / 116)
    assert analysis.removable_channel_fraction == 1.0
    params = sum(p.numel() for p in analysis.graph.module.parameters())
    assert analysis.prunable_param_fraction() == pytest.approx(analysis.prunable_params() / params)


# 4. auto capture: fx leaves an op without a rule, torch.export decomposes it into ops the rules know
class SoftminGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y * F.softmin(y, dim=1)  # over the sequence axis: the channels pass through
        return self.c(F.relu(self.b(y)))


def test_auto_capture_keeps_the_more_prunable_graph():
    x = torch.randn(2, 5, 8)
    fx_analysis = analyze_channels(ptgraph.trace(SoftminGate(), (x,), capture="fx"))
    assert not group_with(fx_analysis, "a.weight", 0).prunable  # the premise: no rule for softmin under fx
    auto = analyze_channels(ptgraph.trace(SoftminGate(), (x,)))
    assert auto.prunable_params() > fx_analysis.prunable_params()
    graph, _, _ = check(SoftminGate(), (x,), [("a.weight", 0), ("b.weight", 0)])
    assert graph.capture == "export" and "softmin" in graph.choice and "torch.export" in graph.choice


def test_auto_capture_keeps_fx_without_unsupported_ops():
    graph = ptgraph.trace(PooledCNN(), (torch.randn(2, 3, 8, 8),))
    assert graph.capture == "fx" and graph.choice == ""


# 5. a linear layer's features reshaped into (C, H, W) feature maps (DCGAN-style generator)
class Generator(nn.Module):
    def __init__(self, unflatten_module: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 64 * 16)
        self.unflatten = nn.Unflatten(1, (64, 4, 4)) if unflatten_module else None
        self.bn = nn.BatchNorm2d(64)
        self.up = nn.ConvTranspose2d(64, 16, 4, 2, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z)
        x = self.unflatten(x) if self.unflatten is not None else x.view(-1, 64, 4, 4)
        x = F.relu(self.up(F.relu(self.bn(x))))
        return torch.tanh(self.out(F.relu(self.bn2(x))))


@pytest.mark.parametrize("capture,unflatten_module", [("fx", False), ("fx", True), ("export", False)])
def test_linear_features_reshaped_into_feature_maps(capture, unflatten_module):
    graph = ptgraph.trace(Generator(unflatten_module), (torch.randn(2, 32),), capture=capture)
    analysis = analyze_channels(graph)
    assert group_with(analysis, "fc.weight", 0).size == 64  # each channel a run of 16 features
    assert analysis.prunable_param_fraction() > 0.9
    check(Generator(unflatten_module), (torch.randn(2, 32),), [("fc.weight", 0), ("up.weight", 1)], capture)


# 6. a group only partly consumed by the model's output
class HalfOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.block = nn.Conv2d(10, 20, 3, padding=1)
        self.next1, self.next2 = nn.Conv2d(10, 12, 1), nn.Conv2d(12, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(F.relu(self.stem(x)))
        to_output, onward = y[:, :10], y[:, 10:]
        return to_output + self.next2(F.relu(self.next1(onward)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_group_partly_consumed_by_the_output(capture):
    _, _, before = check(HalfOutput(), (torch.randn(2, 3, 8, 8),), [("stem.weight", 0), ("next1.weight", 0)],
                         capture)
    block = [g for g in before if any(m.name == "block.weight" and m.axis == 0 for m in g.members)]
    assert sorted((g.size, g.prunable) for g in block) == [(10, False), (10, True)]
    frozen = next(g for g in block if not g.prunable)
    assert frozen.reason == "model output"
    assert any(m.name == "next2.weight" for m in frozen.members)  # added into the output: the same channels
    assert analyze_channels(ptgraph.trace(HalfOutput(), (torch.randn(2, 3, 8, 8),), capture=capture)
                            ).prunable_channel_fraction == pytest.approx(32 / 42)
