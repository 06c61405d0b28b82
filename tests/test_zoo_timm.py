"""The fast subset of the timm sweep (tools/zoo.py --timm; docs/ZOO.md has its numbers).

Small configurations of the timm families whose first sweep ended wrong, each built from config
(no download), traced in train mode, analysed and verified: a random 30% of every exact group is
removed by shrink and must equal the masked model. Skipped when timm is not installed.
"""
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from ptgraph.graph import trace  # noqa: E402
from ptgraph.passes import analyze_channels  # noqa: E402
from ptgraph.passes.verify import TOLERANCE, exercise_zero_params, verify  # noqa: E402


def _check(model: torch.nn.Module, size: int, conv_target: float | None = None):
    model.train()
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = trace(model, (x,))
    assert not graph.leaves, graph.leaves
    # traced in train mode, the graph module must still follow eval(): no dropout, drop path or
    # batch statistics baked into it
    graph.module.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(graph.module(x), model(x), rtol=1e-5, atol=1e-6)
    graph.module.train()
    analysis = analyze_channels(graph)
    share = analysis.conv_prunable_fraction()
    if conv_target is not None:
        assert share > conv_target, f"only {share:.1%} of conv channels prunable"
    exercise_zero_params(graph.module, 0)
    result = verify(analysis, (x,), ratio=0.3, seed=0)
    assert result.rel_err <= TOLERANCE, result
    assert result.params_after == result.params_predicted, result
    assert result.ok
    return analysis, result


def _create(name, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


def test_ghostnet_dropout_traced_from_self_training_follows_eval():
    # forward_head calls F.dropout(x, p=0.2, training=self.training): traced, a literal True
    _, result = _check(_create("ghostnet_050"), 64, conv_target=0.9)
    assert result.groups_pruned > 10


def test_swin_drop_path_stays_a_module():
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                            drop_path_rate=0.2, num_classes=10)
    analysis, result = _check(model, 32)
    assert result.groups_pruned >= 4  # one MLP hidden layer per block
    assert any("DropPath" in type(m).__name__ for m in analysis.graph.module.modules())


def test_efficientnet_batchnorm_act_uses_running_stats_in_eval():
    _, result = _check(_create("test_efficientnet"), 64, conv_target=0.9)
    assert result.groups_pruned > 5


def test_weight_standardised_conv_shrinks_without_crash():
    from timm.layers import ScaledStdConv2d, StdConv2d

    model = _create("test_nfnet")  # ScaledStdConv2d (grouped too) with a learned gain
    assert any(isinstance(m, (StdConv2d, ScaledStdConv2d)) for m in model.modules())
    analysis, result = _check(model, 64)
    assert result.groups_pruned > 0
    inexact = [g for g in analysis.groups if g.prunable and not g.exact]
    assert any("weight standardisation" in g.reason for g in inexact)


def test_bit_resnet_std_conv():
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    model = ResNetV2(layers=(1, 1), channels=(128, 256), stem_chs=64, num_classes=10, conv_layer=StdConv2d)
    analysis, _ = _check(model, 32)
    assert analysis.conv_prunable_fraction() > 0.9  # prunable, though inexact over input channels


def test_levit_attention_bias_table_leaves_channels_prunable():
    model = _create("levit_128s", img_size=64)
    analysis, result = _check(model, 64, conv_target=0.9)
    assert result.groups_pruned > 0
    gathers = [g for g in analysis.groups if not g.prunable and "gathers" in (g.reason or "")]
    assert gathers  # the bias table's position axis: frozen, not the heads


def test_cait_reshape_sizes_computed_at_run_time():
    from timm.models.cait import Cait

    model = Cait(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, depth_token_only=1, num_classes=10)
    _, result = _check(model, 32)
    assert result.groups_pruned > 0


def test_tf_same_padding_conv_and_pool_are_rules_not_untraceable_leaves():
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    model = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                MaxPool2dSame(3, 2), Conv2dSame(8, 8, 3, groups=8), Conv2dSame(8, 16, 1),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    _, result = _check(model, 33, conv_target=0.9)  # an odd size: the padding differs per side
    assert result.groups_pruned == 2
