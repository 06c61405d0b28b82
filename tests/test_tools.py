"""The benchmark tools run from a checkout: FLOP-targeted plans, the CIFAR table on tiny settings."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_step  # noqa: E402
import cifar_table  # noqa: E402


@pytest.mark.parametrize("round_to", [1, 8])
def test_bench_step_finds_the_flop_cut(round_to):
    _, dense = bench_step.pruned("ptgraph:resnet56", 32, 0.0, 1)
    variant = bench_step.at_flop_cut("ptgraph:resnet56", 32, 0.25, round_to, dense)
    assert abs((1 - variant.flops / dense) - 0.25) < 0.06
    widths = [m.out_channels for m in variant.model.modules() if hasattr(m, "out_channels")]
    if round_to == 8:
        assert all(w % 8 == 0 for w in widths)
    else:
        assert any(w % 8 for w in widths)


def test_cifar_table_runs_both_modes_and_reuses_finished_runs(tmp_path, capsys):
    argv = ["--models", "toy_models:small_resnet", "--data", "synthetic:easy", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "16", "--reconfig-every", "1", "--target-flops", "0.5", "--penalty-ratio", "0.9",
            "--out", str(tmp_path)]
    assert cifar_table.main(argv) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    assert [(r["penalty_ratio"], r["target_flops"]) for r in table["rows"]] == [(0.9, None), (None, 0.5)]
    assert all(r["dense_acc"] is not None and r["dense_epoch_seconds"] > 0 for r in table["rows"])
    assert all(0 < r["final_step_time_share"] < 10 for r in table["rows"])
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == [
        "small_resnet-dense", "small_resnet-prunetrain-p0.9", "small_resnet-prunetrain-t0.5"]
    text = (tmp_path / "table.md").read_text()
    assert "| toy_models:small_resnet | ratio 0.9 |" in text and "| toy_models:small_resnet | target 0.5 |" in text
    assert cifar_table.main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 3
    assert cifar_table.main(argv[:-2] + ["--modes", "sparse", "--out", str(tmp_path)]) == 2
    assert cifar_table.main(argv[:-4] + ["--penalty-ratio", "high", "--out", str(tmp_path)]) == 2
    assert cifar_table.main(argv[:-4] + ["--penalty-ratio", "1.5", "--out", str(tmp_path)]) == 2
    assert "--penalty-ratio must be in [0, 1)" in capsys.readouterr().out
    assert cifar_table.main(argv[:-6] + ["--target-flops", "1.5", "--out", str(tmp_path)]) == 2
    assert "--target-flops 1.5 is outside" in capsys.readouterr().out
    bad_data = [("cifar10-jpeg.npz" if a == "synthetic:easy" else a) for a in argv[:-2]]
    assert cifar_table.main(bad_data + ["--out", str(tmp_path / "bad")]) == 2
    assert "unknown --data 'cifar10-jpeg.npz'" in capsys.readouterr().out


def test_budget_sweep_reaches_the_target_and_reports_a_model_that_fails(tmp_path):
    import budget_sweep

    out = tmp_path / "sweep.md"
    rows = budget_sweep.main(["--models", "ptgraph:resnet20?num_classes=10,torchvision:no_such_net", "--steps", "16",
                              "--size", "32", "--batch", "4", "--out", str(out)])
    good, bad = rows
    assert abs(good["share"] - 0.5) <= 0.05 and good["before_point"] >= 2 and good["finite"]
    assert "no_such_net" in bad["error"] and -1 < good["lag"] < 1
    text = out.read_text()
    assert "1 of 2 models within 0.05 of the target" in text and "| torchvision:no_such_net | - | - | error:" in text


def test_budget_sweep_passes_round_to_to_the_worker():
    import budget_sweep

    row, = budget_sweep.main(["--worker", "ptgraph:resnet20?num_classes=10", "--round-to", "8", "--steps", "16",
                              "--size", "32", "--batch", "4"])
    assert abs(row["share"] - 0.5) <= 0.05 and row["finite"] and row["round_to"] == 8
    args = dict(target=0.5, steps=1, reconfigurations=1, size=8, batch=1, lr=0.1, threads=1, allocation=None)
    flags = budget_sweep.forwarded(budget_sweep.argparse.Namespace(**args, round_to=8))  # what each subprocess gets
    assert flags[flags.index("--round-to") + 1] == "8"


def test_budget_sweep_refuses_a_bad_target_before_building_anything(capsys):
    import budget_sweep

    with pytest.raises(SystemExit) as e:
        budget_sweep.main(["--target", "1.5", "--models", "torchvision:resnet50"])
    assert e.value.code == 2 and "--target-flops 1.5 is outside (0, 1]" in capsys.readouterr().err


def test_zoo_hf_worker_builds_a_tiny_llama_and_verifies_it(tmp_path):
    """tools/zoo_hf.py end to end on one type: its subprocess worker builds the tiny config, captures, analyses
    and verifies; the record carries what the report needs and renders as a verified row."""
    pytest.importorskip("transformers")
    import zoo_hf

    rec = zoo_hf.run_one("llama", 0.3, 120, onnx=False)
    assert rec["status"] == "verified" and rec["why"] == "" and rec["exit"] == 0, rec
    assert (rec["class"], rec["task"], rec["capture"], rec["input"]) == (
        "LlamaForCausalLM", "causal-lm", "export", "input_ids 2x16")
    for change in ("num_hidden_layers=2", "hidden_size=64", "num_key_value_heads=2", "vocab_size=256"):
        assert change in rec["tiny"], rec["tiny"]
    assert rec["params"] == rec["params_before"] < 200_000
    assert rec["verify_ok"] and rec["rel_err"] <= 1e-4 and rec["groups_pruned"] >= 1
    assert rec["params_after"] == rec["params_predicted"] < rec["params_before"]
    assert rec["groups"] > rec["prunable_groups"] >= rec["exact_groups"] >= 1 and 0.3 < rec["channel_share"] < 1
    assert rec["random_ops"] == 0 and "onnx_ok" not in rec  # deterministic in eval; --no-onnx
    broken = {"model": "x", "status": "WRONG", "why": "analyze: KeyError: 'a'", "where": "passes/groups.py:f:1"}
    text = zoo_hf.render([rec, broken], [], {"cpu": "c", "cores": "2", "os": "o", "python": "3", "torch": "t"},
                         0.3, 120, [], zoo_hf.kept_diagnosis(""))
    assert "| llama | LlamaForCausalLM | causal-lm | input_ids 2x16 | export | verified |" in text
    assert "verified: **1**; WRONG: **1**" in text and "- **x** (" in text and "passes/groups.py:f:1" in text


def test_cifar_table_baselines_match_the_prunetrain_runs_training_flops(tmp_path, capsys):
    argv = ["--models", "toy_models:small_resnet", "--data", "synthetic:easy", "--epochs", "2", "--steps-per-epoch", "6",
            "--batch-size", "16", "--target-flops", "0.5", "--time-steps", "1", "--out", str(tmp_path)]
    assert cifar_table.main(argv + ["--modes", "scratch"]) == 2  # no PruneTrain run to match yet
    assert "add prunetrain to --modes" in capsys.readouterr().out
    assert cifar_table.main(argv + ["--modes", "prunetrain,scratch,short"]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "table.json").read_text())["equal_training_flops"]}
    assert set(rows) == {"prunetrain", "scratch", "short"}
    pt, scratch, short = rows["prunetrain"], rows["scratch"], rows["short"]
    assert short["steps_per_epoch"] < 6 < scratch["steps_per_epoch"]  # the dense model costs more a step, the final one less
    for r in (scratch, short):  # within half a step an epoch (2 epochs) of the PruneTrain run's training FLOPs
        step_flops = 3 * r["flops"] * 16
        assert abs(r["train_flops"] - pt["train_flops"]) <= 0.5 * step_flops * 2
    assert scratch["flops"] == pt["flops"] and short["flops"] == pt["dense_flops"]
    # the final architecture, freshly initialised: the run's widths, not its weights
    pruned, _ = cifar_table.checkpoint.rebuild(cifar_table.checkpoint.load(tmp_path / "small_resnet-prunetrain-t0.5"))
    fresh = cifar_table.final_architecture(str(tmp_path / "small_resnet-prunetrain-t0.5" / "checkpoint.pt"))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(fresh) == shapes(pruned)
    assert not torch.equal(fresh.state_dict()["stem.0.weight"], pruned.state_dict()["stem.0.weight"])
    text = (tmp_path / "table.md").read_text()
    assert "| final architecture from scratch |" in text and "| dense, shorter schedule |" in text
    assert cifar_table.main(argv + ["--modes", "scratch,short"]) == 0  # finished baselines are reused
    assert capsys.readouterr().out.count("reusing") == 2
