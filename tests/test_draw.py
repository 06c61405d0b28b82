"""--draw: the graph drawn with its channel groups, frozen groups and their reasons named in the file."""
import time
import warnings

import pytest
import torch
import torchvision

from ptgraph.cli import main
from ptgraph.draw import draw
from ptgraph.graph import trace
from ptgraph.passes import analyze_channels
from toy_models import CatNet, WithUntraceableBlock


def _analysis(model, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untraceable block's one-line warning
        return analyze_channels(trace(model, torch.randn(shape)))


def test_svg_names_groups_and_frozen_reasons(tmp_path):
    analysis = _analysis(WithUntraceableBlock(), (1, 3, 8, 8))
    out = draw(analysis, tmp_path / "g.svg")
    text = out.read_text()
    assert out.stat().st_size > 1000 and text.lstrip().startswith("<?xml")
    frozen = [g for g in analysis.groups if not g.prunable]
    assert {g.reason for g in frozen} >= {"model output"} and len(frozen) >= 2
    for g in analysis.groups:
        assert f"g{g.id} (" in text  # every group is named (legend and boxes)
    for g in frozen:  # and why each frozen one is frozen
        assert g.reason.replace("'", "&#x27;") in text or g.reason in text, g.reason
    assert "untraceable leaf" in text and "Conv2d a" in text  # boxes say what they are


def test_concatenation_shows_both_groups(tmp_path):
    analysis = _analysis(CatNet(), (1, 3, 8, 8))
    text = draw(analysis, tmp_path / "cat.svg").read_text()
    assert "g0 (8) + g1 (6)" in text  # the cat box carries both branches' groups, in channel order


def test_inexact_group_is_marked(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    analysis = _analysis(model, (2, 4))
    inexact = [g for g in analysis.groups if g.prunable and not g.exact]
    assert inexact
    text = draw(analysis, tmp_path / "ln.svg").read_text()
    assert f"g{inexact[0].id} (8) ~inexact" in text and "dashed border: inexact group" in text


@pytest.mark.parametrize("suffix", [".png", ".pdf"])
def test_raster_and_pdf(tmp_path, suffix):
    out = draw(_analysis(CatNet(), (1, 3, 8, 8)), tmp_path / f"g{suffix}")
    assert out.stat().st_size > 1000


def test_resnet18_draws_quickly(tmp_path):
    analysis = _analysis(torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64))
    start = time.perf_counter()
    text = draw(analysis, tmp_path / "r18.svg").read_text()
    assert time.perf_counter() - start < 20  # about 1 s on a quiet core
    assert "Conv2d layer4.1.conv2" in text and "frozen: model output" in text
    # conv -> bn -> relu is one box; every conv still has its own
    assert text.count("+BatchNorm2d") == 20 and "Conv2d layer2.0.downsample.0" in text


def test_cli_draw_and_bad_extension(tmp_path, capsys):
    out = tmp_path / "r.svg"
    code = main(["analyze", "--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8", "--draw", str(out)])
    assert code == 0 and out.stat().st_size > 1000
    assert f"drawing: {out}" in capsys.readouterr().out
    code = main(["analyze", "--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8",
                 "--draw", str(tmp_path / "r.jpg")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and ".svg, .png or .pdf" in err
    assert not (tmp_path / "r.jpg").exists()
