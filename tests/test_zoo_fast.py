"""The fast subset of the model zoo (tools/zoo.py sweeps all of torchvision; docs/ZOO.md has its numbers).

Each model is built with random weights (no download), traced in train mode, analysed and
verified on a small input: a random 30% of every exact group is removed by shrink and the
result must equal the masked model, with the parameter count the groups predict.
"""
import warnings

import pytest
import torch
import torchvision

from ptgraph.graph import trace
from ptgraph.passes import analyze_channels
from ptgraph.passes.verify import TOLERANCE, exercise_zero_params, verify

CNNS = [
    ("resnet18", 64), ("densenet121", 64), ("mobilenet_v3_small", 64), ("efficientnet_b0", 64),
    ("regnet_x_400mf", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_0", 64), ("convnext_tiny", 64),
]  # googlenet: below, with its auxiliary heads


def _check(model: torch.nn.Module, size: int):
    model.train()  # train mode keeps auxiliary heads (googlenet) in the graph
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = trace(model, (x,))
    assert not graph.leaves, graph.leaves  # every submodule traced through
    analysis = analyze_channels(graph)
    exercise_zero_params(graph.module, 0)
    share = analysis.conv_prunable_fraction()
    result = verify(analysis, (x,), ratio=0.3, seed=0)
    assert result.rel_err <= TOLERANCE, result
    assert result.params_after == result.params_predicted < result.params_before, result
    assert result.groups_pruned > 0
    assert result.ok
    return analysis, share


@pytest.mark.parametrize("name,size", CNNS, ids=[n for n, _ in CNNS])
def test_cnn_verifies_and_conv_channels_prunable(name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    _, share = _check(model, size)
    assert share > 0.9, f"{name}: only {share:.1%} of conv channels prunable"


def test_googlenet_aux_heads_stay_analysed():
    # init_weights=False: torchvision's truncated-normal init takes seconds and changes nothing here
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    analysis, share = _check(model, 64)
    assert share > 0.9, f"googlenet: only {share:.1%} of conv channels prunable"
    names = {m.name for g in analysis.groups if g.prunable for m in g.members}
    assert any(n.startswith("aux1.") for n in names) and any(n.startswith("aux2.") for n in names)


def test_small_vit_verifies():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    analysis, _ = _check(model, 32)
    mlp_hidden = [g for g in analysis.groups if g.prunable and any(".mlp.0." in m.name and m.axis == 0 for m in g.members)]
    assert len(mlp_hidden) == 2  # one MLP hidden layer per encoder block
    stream = [g for g in analysis.groups if any(m.name == "conv_proj.weight" and m.axis == 0 for m in g.members)]
    assert stream[0].prunable  # nn.MultiheadAttention traced through: its projections carry the stream
    heads = [g for g in analysis.groups if any(m.name.endswith("self_attention.in_proj_weight") and m.axis == 0
                                               for m in g.members)]
    assert len(heads) == 2 and all(g.prunable and g.exact and g.size == 2 for g in heads)  # whole heads


@pytest.mark.parametrize("spec,last_map", [("ptgraph:mobilenet_v2?width_mult=0.5", 4),
                                           ("ptgraph:mobilenet_v2?width_mult=0.5&stride=16", 2)])
def test_cifar_mobilenet_v2_verifies_at_both_strides(spec, last_map):
    from ptgraph.specs import build_model

    model = build_model(spec)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-1] == last_map
    _, share = _check(model, 32)
    assert share > 0.9


def test_cifar_mobilenet_v2_rejects_other_strides():
    from ptgraph.errors import UserError
    from ptgraph.specs import build_model

    with pytest.raises(UserError, match="stride=8 or stride=16"):
        build_model("ptgraph:mobilenet_v2?stride=32")


def test_cifar_resnet_width_mult_scales_every_stage():
    """A narrower ResNet of the same design (the from-scratch baseline a pruned one is compared with)."""
    from ptgraph.errors import UserError
    from ptgraph.specs import build_model

    narrow = build_model("ptgraph:resnet20?width_mult=0.5")
    widths = [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[:1] == [8] and set(widths) == {8, 16, 32}
    assert narrow.fc.in_features == 32
    _, share = _check(narrow, 32)
    assert share > 0.9
    with pytest.raises(UserError, match="width_mult"):
        build_model("ptgraph:resnet20?width_mult=0")
    with pytest.raises(UserError, match="width_mult"):
        build_model("ptgraph:resnet20?width_mult=True")


def test_torchvision_builders_get_no_backbone_weights(monkeypatch):
    """Segmentation and detection builders default to downloading ImageNet backbone weights; a spec means
    random weights and nothing downloaded, unless the user names weights_backbone."""
    from ptgraph.specs import build_model

    def no_download(*args, **kwargs):
        raise AssertionError("a spec tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    model = build_model("torchvision:lraspp_mobilenet_v3_large?num_classes=3")
    assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 3, 32, 32)
    with pytest.raises(AssertionError, match="download"):
        build_model("torchvision:lraspp_mobilenet_v3_large?weights_backbone='DEFAULT'")


def test_default_input_shape_follows_the_first_conv():
    from ptgraph.specs import build_model, default_input_shape

    video = build_model("torchvision:r3d_18")
    assert default_input_shape("torchvision:r3d_18", video) == (1, 3, 16, 112, 112)
    image = build_model("torchvision:squeezenet1_1")
    assert default_input_shape("torchvision:squeezenet1_1", image) == (1, 3, 224, 224)
    assert default_input_shape("torchvision:r3d_18") == (1, 3, 224, 224)  # no model: the image default


def test_conv_share_counts_the_convs_of_an_exported_graph():
    """A graph captured by torch.export has no conv modules (RAFT): its aten convs count the same."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 6, 2),
                                torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    shares = [analyze_channels(trace(model, (x,), capture=c)).conv_prunable_fraction() for c in ("fx", "export")]
    assert shares == [1.0, 1.0]  # the last conv's channels are the output, not counted
