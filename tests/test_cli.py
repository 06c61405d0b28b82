"""The command line: analysis output, --verify, and one clear line with exit code 2 for bad input."""
import json

import pytest

from ptgraph.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_json_verify(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "toy_models:ResidualNet", "--input-shape", "2,3,8,8",
                       "--verify", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["verify"]["ok"] and info["verify"]["rel_err"] < 1e-4
    assert info["verify"]["params_after"] < info["verify"]["params_before"]
    assert 0 < info["prunable_channel_fraction"] <= 1
    residual = [g for g in info["groups"] if g["size"] == 8 and g["members"] >= 8]
    assert residual and residual[0]["prunable"]  # stem + body + head input: one residual group
    frozen = [g for g in info["groups"] if not g["prunable"]]
    assert any(g["reason"] == "model output" for g in frozen)


def test_analyze_table(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8")
    assert code == 0
    assert "channel groups" in out and "prunable" in out and "frozen: model output" in out


def test_untraceable_submodule_becomes_leaf(capsys):
    code, out, err = run(capsys, "analyze", "--model", "toy_models:WithUntraceableBlock", "--input-shape", "1,3,8,8",
                         "--verify", "--json")
    assert code == 0
    info = json.loads(out)
    assert "gate" in info["leaves"]
    assert err.count("\n") == 1 and "'gate'" in err and "frozen" in err
    reasons = [g["reason"] for g in info["groups"] if not g["prunable"]]
    assert any("gate" in (r or "") for r in reasons)
    assert info["verify"]["ok"]


def test_ignore_freezes_module(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8",
                       "--ignore", "body", "--json")
    info = json.loads(out)
    assert code == 0
    assert any("ignored by the user" in (g["reason"] or "") for g in info["groups"])


@pytest.mark.parametrize("argv, words", [
    (["--model", "torchvision:not_a_net"], "torchvision has no model"),
    (["--model", "no_such_pkg.models:net"], "cannot import module 'no_such_pkg.models'"),
    (["--model", "toy_models:missing"], "has no callable 'missing'"),
    (["--model", "toy_models:not_a_model"], "not an nn.Module"),
    (["--model", "resnet50"], "is not SOURCE:NAME"),
    (["--model", "toy_models:DataDependent", "--input-shape", "1,3,8,8"], "nor torch.export can trace the top level"),
    (["--model", "toy_models:ResidualNet", "--input-shape", "1,4,8,8"], "does not run on inputs of shape"),
    (["--model", "toy_models:ResidualNet", "--input-shape", "1,three,8"], "is not a list of integers"),
    (["--model", "toy_models:ResidualNet?width=x"], "cannot build"),
    (["--model", "toy_models:ResidualNet", "--ignore", "nothing.here"], "module 'nothing.here' is not in the model"),
    (["--model", "toy_models:ResidualNet", "--input-shape", "1,3,8,8", "--verify", "--ratio", "1.5"], "ratio 1.5"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    code, out, err = run(capsys, "analyze", *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err


def test_video_model_gets_a_clip_by_default(capsys):
    code, out, _ = run(capsys, "analyze", "--model", "toy_models:TinyVideoNet", "--verify", "--json")
    info = json.loads(out)
    assert code == 0 and info["verify"]["ok"]  # a 4-D image would not run through its Conv3d stem


def test_two_input_model_takes_one_shape_per_input(capsys):
    code, _, err = run(capsys, "analyze", "--model", "toy_models:TwoInputNet", "--input-shape", "1,3,8,8")
    assert code == 2 and err.count("\n") == 1
    assert "needs 2 inputs (image1, image2) but 1 input shape was given" in err
    code, out, _ = run(capsys, "analyze", "--model", "toy_models:TwoInputNet", "--input-shape", "1,3,8,8",
                       "--input-shape", "1,3,8,8", "--verify", "--onnx", "--json")
    info = json.loads(out)
    assert code == 0 and info["verify"]["ok"] and info["onnx"]["ok"]
    shared = [g for g in info["groups"] if g["prunable"] and g["members"] >= 5]  # a, b and head's input: one group
    assert shared and shared[0]["size"] == 8


def test_debug_shows_traceback():
    from ptgraph.errors import UserError

    with pytest.raises(UserError):
        main(["analyze", "--model", "torchvision:not_a_net", "--debug"])


def test_prune_train_help_groups_and_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prune-train", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    groups = ["model and data:", "budget:", "the paper's method:", "performance:", "distributed:", "run:"]
    assert all(g in out for g in groups)
    seed = out[out.index("  --seed SEED "):out.index("  --seed SEED ") + 200]
    assert "(default: 0)" in " ".join(seed.split())  # a default of 0 is shown
    assert "default: True" not in out and "default: False" not in out  # on/off flags are off unless given
