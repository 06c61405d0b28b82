"""One small model per op family: shrink equals mask on exact groups, and everything prunable still runs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptgraph
from ptgraph.passes import analyze_channels, count_params, mask, predict_params, random_plan, shrink


def _out(y):
    return y if isinstance(y, torch.Tensor) else torch.cat([t.flatten() for t in y])


def check_exact(model, x, ratio=0.4, seed=0, capture="auto"):
    """Prune every exact group at random; the shrunk model must compute what the masked one does."""
    torch.manual_seed(seed)
    model = model.double()
    x = x.double()
    graph = ptgraph.trace(model, (x,), capture=capture)
    analysis = analyze_channels(graph)
    plan = random_plan(analysis.groups, ratio, seed)
    assert plan.keep, "nothing to prune: the test model has no exact prunable group"
    gm = graph.module.eval()
    masked = mask(copy.deepcopy(gm), analysis, plan)
    predicted = predict_params(analysis, plan)
    shrink(analysis, plan)
    with torch.no_grad():
        got, want = _out(gm(x)), _out(masked(x))
    assert got.shape == want.shape
    assert (got - want).norm() <= 1e-6 * want.norm() + 1e-12
    assert count_params(gm) == predicted
    _train_step(gm, x)
    return analysis


def check_runs(model, x, ratio=0.4, seed=0):
    """Prune every prunable group, exact or not: the model still runs forward and backward."""
    graph = ptgraph.trace(model, (x,))
    analysis = analyze_channels(graph)
    plan = random_plan(analysis.groups, ratio, seed, exact_only=False)
    before = graph.module(x)
    shrink(analysis, plan)
    after = graph.module(x)
    assert _out(after).shape == _out(before).shape
    _train_step(graph.module, x)
    return analysis


def _train_step(gm, x):
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    _out(gm(x)).square().mean().backward()
    opt.step()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.a(x)
        x = x + self.b(x)
        return self.fc(torch.flatten(x, 1))  # flatten(C,H,W) -> linear


def test_residual_and_flatten_linear():
    analysis = check_exact(Residual(), torch.randn(2, 3, 4, 4))
    stream = [g for g in analysis.groups if any(m.name == "a.weight" for m in g.members)][0]
    names = {m.name for m in stream.members}
    assert {"a.weight", "b.0.weight", "b.1.weight", "fc.weight"} <= names
    fc = [m for m in stream.members if m.name == "fc.weight"][0]
    assert len(fc.positions) == stream.size * 16  # each channel owns H*W inputs of the linear


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.shared(torch.relu(self.shared(x))))  # same weights twice


def test_module_called_twice_shares_channels():
    analysis = check_exact(SharedConv(), torch.randn(1, 3, 5, 5))
    groups = [g for g in analysis.groups if any(m.name == "shared.weight" for m in g.members)]
    assert len(groups) == 1  # in and out channels of the shared conv are one group


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(6, 8))
        self.scale = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1) * self.scale
        return F.linear(x.mean((2, 3)), self.w2)


def test_functional_calls_on_parameters():
    analysis = check_exact(Functional(), torch.randn(2, 3, 6, 6))
    g = [g for g in analysis.groups if any(m.name == "w1" for m in g.members)][0]
    assert {m.name for m in g.members} == {"w1", "b1", "w2", "scale"}


class GroupedAndDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(F.relu(self.grouped(F.relu(self.a(x)))))))


def test_grouped_conv_prunes_whole_blocks():
    model = GroupedAndDepthwise()
    analysis = check_exact(model, torch.randn(1, 3, 5, 5), ratio=0.5)
    assert model.grouped.groups == model.grouped.out_channels // 2
    assert model.dw.groups == model.dw.in_channels and model.dw.out_channels == 2 * model.dw.in_channels
    assert analysis.groups


class SplitCatShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        y = self.a(x)
        left, right = y.chunk(2, dim=1)
        y = torch.cat([left, self.b(right)], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)  # channel shuffle
        z = self.c(y) + self.d(x)
        return torch.cat([z[:, :2], torch.narrow(z, 1, 2, 4)], dim=1)


def test_split_cat_shuffle_slices():
    check_exact(SplitCatShuffle(), torch.randn(1, 3, 4, 4))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head((x * s).mean((2, 3)))


def test_squeeze_excitation_gating():
    check_exact(SqueezeExcite(), torch.randn(2, 3, 4, 4))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.b = nn.Conv1d(8, 6, 1)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.t = nn.ConvTranspose1d(6, 5, 2)
        self.c = nn.Conv3d(5, 2, 1)

    def forward(self, x):
        x = self.gn(self.a(x)).flatten(2)
        x = self.t(F.relu(self.inorm(self.b(x))))
        return self.c(x.unsqueeze(-1).unsqueeze(-1))


def test_norms_1d_3d_transposed():
    model = Norms()
    check_exact(model, torch.randn(2, 3, 3, 3))
    assert model.gn.num_groups * 2 == model.gn.num_channels  # whole GroupNorm groups were pruned


class Attention(nn.Module):
    """Hand-written attention with literal head sizes in its reshapes."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, 16))
        return x + self.mlp(self.ln(x))


def test_attention_heads_and_mlp():
    analysis = check_runs(Attention(), torch.randn(2, 5, 16))
    hidden = [g for g in analysis.groups if any(m.name == "mlp.0.weight" and m.axis == 0 for m in g.members)][0]
    assert hidden.prunable and hidden.exact
    check_exact(Attention(), torch.randn(2, 5, 16))


class MHA(nn.Module):
    def __init__(self, batch_first=True, dropout=0.0, need_weights=False, cross=False, masked=False):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=dropout)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
        self.need_weights, self.cross = need_weights, cross
        self.register_buffer("mask", torch.zeros(3, 3) if masked else None)

    def forward(self, x):
        x = self.inp(x)
        kv = x * 2 if self.cross else x
        a, w = self.attn(x, kv, kv, need_weights=self.need_weights, attn_mask=self.mask)
        x = x + a
        return (x + self.mlp(x), w) if self.need_weights else x + self.mlp(x)


def _group_of(analysis, name, axis):
    return next(g for g in analysis.groups if any(m.name == name and m.axis == axis for m in g.members))


@pytest.mark.parametrize("batch_first,need_weights,dropout,unbatched", [
    (True, False, 0.0, False), (False, True, 0.0, False), (True, True, 0.1, False), (False, False, 0.2, True)])
def test_multihead_attention_opens_under_fx(batch_first, need_weights, dropout, unbatched):
    """fx traces a self-attention nn.MultiheadAttention through its decomposition: the stream and the
    heads are prunable, the shrunk graph computes what the masked one does, and dropout follows the mode."""
    model = MHA(batch_first, dropout, need_weights)
    x = torch.randn(3, 4) if unbatched else torch.randn(2, 3, 4)
    graph = ptgraph.trace(model, (x,))
    assert graph.capture == "fx" and graph.opened == ("attn",)
    with torch.no_grad():
        assert torch.allclose(_out(graph.module.eval()(x)), _out(model.eval()(x)), atol=1e-6)
    analysis = check_exact(model, x, capture="fx")
    assert not analysis.original_module_runs_pruned  # the user's module keeps its embed_dim
    stream = _group_of(analysis, "inp.weight", 0)
    assert any(m.name == "attn.in_proj_weight" and m.axis == 1 for m in stream.members)
    assert any(m.name == "attn.out_proj.weight" and m.axis == 0 for m in stream.members)
    heads = _group_of(analysis, "attn.in_proj_weight", 0)
    assert heads.prunable and heads.size == (4 if unbatched else 2)  # batched: whole heads; unbatched: head dims
    assert heads.exact == (not unbatched and not need_weights)  # the returned weights average over the heads
    if dropout:
        gm = analysis.graph.module.train()
        assert not torch.allclose(_out(gm(x.double())), _out(gm(x.double())))
        gm.eval()
        assert torch.equal(_out(gm(x.double())), _out(gm(x.double())))


@pytest.mark.parametrize("kind", ["cross", "masked", "leaf"])
def test_multihead_attention_stays_whole_when_not_plain_self_attention(kind):
    """Calls the decomposition does not cover (cross-attention, masks) and a module the user asks to keep whole
    stay one node under fx, with the embedding stream frozen; auto capture opens them with torch.export."""
    model = MHA(cross=kind == "cross", masked=kind == "masked")
    x = torch.randn(2, 3, 4)
    graph = ptgraph.trace(model, (x,), leaf_modules=[nn.MultiheadAttention] if kind == "leaf" else (), capture="fx")
    assert graph.opened == ()
    analysis = check_exact(model, x, capture="fx") if kind != "leaf" else analyze_channels(graph)
    stream = _group_of(analysis, "inp.weight", 0)
    assert not stream.prunable and "MultiheadAttention" in stream.reason
    assert _group_of(analysis, "mlp.0.weight", 0).prunable
    if kind != "leaf":
        exported = check_exact(model, x)  # auto: torch.export opens nn.MultiheadAttention up
        assert exported.graph.capture == "export"


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))  # cumsum over channels: no rule


def test_unknown_op_freezes_with_its_name():
    graph = ptgraph.trace(Unknown(), (torch.randn(1, 3, 2, 2),))
    groups = analyze_channels(graph).groups
    a = [g for g in groups if any(m.name == "a.weight" and m.axis == 0 for m in g.members)][0]
    assert not a.prunable and "cumsum" in a.reason


def test_googlenet_aux_heads_survive_shrink_in_training():
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10)
    graph = ptgraph.trace(model, (torch.randn(2, 3, 64, 64),))
    targets = {n.target for n in graph.module.graph.nodes if n.op == "call_module"}
    assert any(t.startswith("aux1.") for t in targets)  # traced in train mode: aux heads are in the graph
    analysis = analyze_channels(graph)
    shrink(analysis, random_plan(analysis.groups, 0.3, 0, exact_only=False))
    out = graph.module(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 10)
    (out.logits.sum() + out.aux_logits1.sum() + out.aux_logits2.sum()).backward()


def test_second_shrink_without_retrace():
    model = Residual()
    x = torch.randn(2, 3, 4, 4)
    graph = ptgraph.trace(model, (x,))
    analysis = analyze_channels(graph)
    for seed in range(3):
        before = {g.id: g.size for g in analysis.groups}
        plan = random_plan(analysis.groups, 0.3, seed)
        report = shrink(analysis, plan)
        for gid, keep in plan.keep.items():
            assert report.groups[gid] == (before[gid], len(keep))
            assert analysis.group(gid).size == len(keep)
    assert graph.module(x).shape == (2, 5)
    assert model.b[0].out_channels == model.b[1].num_features == model.a.out_channels


def test_plan_round_trip_and_checks():
    from ptgraph.errors import UserError
    from ptgraph.passes import PrunePlan

    analysis = analyze_channels(ptgraph.trace(Residual(), (torch.randn(1, 3, 4, 4),)))
    plan = random_plan(analysis.groups, 0.5, 1)
    assert PrunePlan.from_json(plan.to_json()) == plan
    gid = next(iter(plan.keep))
    with pytest.raises(UserError):
        shrink(analysis, PrunePlan({gid: ()}))
    frozen = [g for g in analysis.groups if not g.prunable][0]
    with pytest.raises(UserError):
        shrink(analysis, PrunePlan({frozen.id: (0,)}))


def test_shrink_keeps_channels_last_weights_grads_and_state():
    model = Residual().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    graph = ptgraph.trace(model, (x,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    graph.module(x).sum().backward()
    opt.step()
    analysis = analyze_channels(graph)
    shrink(analysis, random_plan(analysis.groups, 0.5, 0), opt)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert convs
    for p in convs:
        assert p.is_contiguous(memory_format=torch.channels_last)
        assert p.grad.is_contiguous(memory_format=torch.channels_last)
        assert opt.state[p]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    assert graph.module(x).shape == (2, 5)
