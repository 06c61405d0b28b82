"""Patterns the Hugging Face sweep (tools/zoo_hf.py) found in transformers' models, each as a small model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptgraph
from ptgraph.passes import analyze_channels
from test_ops import check_exact, check_runs


class CacheCat(nn.Module):
    """XLM's attention cache: new keys concatenated onto an empty 1-D tensor, which torch.cat skips."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = torch.cat([torch.empty(0, dtype=x.dtype), torch.relu(self.proj(x))], dim=1)
        return self.out(keys)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_cat_onto_an_empty_tensor_keeps_the_channels_prunable(capture):
    check_exact(CacheCat(), torch.randn(3, 8), capture=capture)  # it prunes the 12 concatenated channels, the one group


class CastNorm(nn.Module):
    """HF's RMSNorm: the weight cast before use and its shape read off the parameter (a constant once exported)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), 1e-6).type_as(x)


class CastNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), CastNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


def test_a_norm_weight_cast_before_use_shares_the_normalised_channels():
    graph = ptgraph.trace(CastNormNet(), (torch.randn(2, 8),), capture="export")
    group = {(m.name, m.axis): g.id for g in analyze_channels(graph).groups for m in g.members}
    assert group[("norm.weight", 0)] == group[("up.weight", 0)] == group[("down.weight", 1)]
    check_runs(graph.module, torch.randn(2, 8))  # pruned with its stream, normalized_shape follows


class CastGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.weight, self.head = nn.Conv2d(3, 8, 3), nn.Parameter(torch.rand(8) + 0.5), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.group_norm(self.conv(x), 4, self.weight * 2))


def test_a_computed_group_norm_weight_shares_the_normalised_channels():
    graph = ptgraph.trace(CastGroupNorm(), (torch.randn(1, 3, 8, 8),))
    group = {(m.name, m.axis): g.id for g in analyze_channels(graph).groups for m in g.members}
    assert group[("weight", 0)] == group[("conv.weight", 0)]
    check_exact(CastGroupNorm(), torch.randn(1, 3, 8, 8))


class CastLinearNet(nn.Module):
    """A linear layer on cast parameters (HF's mixed-precision pattern) between two plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(8, 12), nn.Linear(12, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        h = torch.relu(F.linear(h.float(), self.mid.weight.float(), self.mid.bias.float()).type_as(x))
        return self.down(h)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_linear_layer_on_cast_parameters_is_prunable_on_both_sides(capture):
    analysis = check_exact(CastLinearNet(), torch.randn(3, 8), capture=capture)
    group = {(m.name, m.axis): g for g in analysis.groups for m in g.members}
    assert group[("mid.weight", 1)].prunable and group[("mid.weight", 1)] is group[("up.weight", 0)]
    assert group[("mid.weight", 0)].prunable and group[("mid.weight", 0)] is group[("down.weight", 1)]
