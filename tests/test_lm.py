"""Language-model data and inputs: token files, the generated token source, next-token training with
perplexity, a FLOPs target on the tiny GPT, token inputs for analyze/export, and one-line errors."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptgraph.cli import main
from ptgraph.lm_models import gpt
from ptgraph.trainers.data import load_data
from ptgraph.trainers.tokens import synthetic_tokens

TINY = "ptgraph:gpt?n_layer=1&n_embd=32&n_head=2&block_size=32"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _write(folder, train, val):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(folder / "val.bin")
    return folder


def test_token_files_are_cut_into_blocks_and_shifted_targets(tmp_path):
    ids = np.arange(1000) % 50
    data = load_data(f"tokens:{_write(tmp_path / 'd', ids, ids[:200])}")
    assert data.num_classes == 50 and data.family == "tokens"
    data, (example,) = data.task.fit(data, gpt(vocab_size=64, block_size=16), None)  # the model's block_size
    assert example.shape == (2, 16) and example.dtype == torch.long
    assert len(data.val) == 199 // 16
    x, y = data.val[1]  # consecutive blocks, targets one token later
    assert x.tolist() == (ids[16:32]).tolist() and y.tolist() == (ids[17:33]).tolist()
    one = list(data.train.batches(4, 0, 1, True, seed=7))
    assert len(one) == len(data.train) // 4 and one[0][0].shape == (4, 16)
    assert all(torch.equal(b[1][:, :-1], b[0][:, 1:]) for b in one)
    again = list(data.train.batches(4, 0, 1, True, seed=7))  # the same seed draws the same blocks (resume)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    ranks = [list(data.train.batches(2, r, 2, True, seed=7)) for r in (0, 1)]  # 2 processes: the same global batch
    assert torch.equal(torch.cat([ranks[0][0][0], ranks[1][0][0]]).sort(0).values, one[0][0].sort(0).values)
    val_batches = list(data.val.batches(5, 0, 1, False, 0))
    assert sum(len(b[0]) for b in val_batches) == len(data.val)


def test_synthetic_tokens_are_learnable():
    train, val = synthetic_tokens(n_train=20_000, n_val=2_000)
    assert train.max() < 256 and len(np.unique(train)) > 200  # the whole vocabulary is used
    torch.manual_seed(0)
    model = gpt(n_layer=1, n_embd=32, n_head=2, block_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rows = torch.from_numpy(val[:33 * 16].astype(np.int64)).view(16, 33)

    def val_loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten()))

    before, gen = val_loss(), torch.Generator().manual_seed(0)
    assert before == pytest.approx(math.log(256), abs=0.3)
    for _ in range(40):
        starts = torch.randint(0, len(train) - 33, (16,), generator=gen).tolist()
        b = torch.from_numpy(np.stack([train[s:s + 33] for s in starts]).astype(np.int64))
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert val_loss() < before - 0.5


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dense_prune_train_reports_loss_and_perplexity(capsys, tmp_path):
    code, out, err = run_cli(capsys, "prune-train", "--model", TINY, "--data", "tokens:synthetic", "--dense",
                             "--epochs", "2", "--steps-per-epoch", "8", "--run-dir", str(tmp_path / "r"),
                             "--no-tensorboard")
    assert code == 0, err
    epochs = [r for r in _records(tmp_path / "r") if r["kind"] == "epoch"]
    assert len(epochs) == 2 and "val_acc" not in epochs[0]
    assert epochs[-1]["val_ppl"] == pytest.approx(math.exp(epochs[-1]["val_loss"]))
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] < math.log(256) + 0.5
    assert "val ppl" in out and "val acc" not in out
    report = (tmp_path / "r" / "report.md").read_text()
    assert "val_ppl" in report and "| val loss | val ppl |" in report


def test_target_flops_on_the_tiny_gpt_is_reached_and_exports(capsys, tmp_path):
    code, out, err = run_cli(capsys, "prune-train", "--model", TINY, "--data", "tokens:synthetic", "--target-flops",
                             "0.7", "--epochs", "1", "--steps-per-epoch", "40", "--run-dir", str(tmp_path / "r"),
                             "--no-tensorboard")
    assert code == 0, err
    last = [r for r in _records(tmp_path / "r") if r["kind"] == "epoch"][-1]
    assert last["flops"] <= 0.74 * last["dense_flops"] and last["flops"] >= 0.6 * last["dense_flops"]
    assert math.isfinite(last["val_ppl"]) and last["train_flops_share"] < 1
    code, out, err = run_cli(capsys, "export", str(tmp_path / "r"), "--out", str(tmp_path / "lm.onnx"))
    assert code == 0 and "onnxruntime OK" in out, out + err  # token ids from the checkpoint's input dtype
    code, out, err = run_cli(capsys, "prune-train", "--model", f"run:{tmp_path / 'r'}", "--dense", "--data",
                             "tokens:synthetic", "--epochs", "1", "--steps-per-epoch", "4", "--run-dir",
                             str(tmp_path / "again"), "--no-tensorboard")
    assert code == 0, err  # its final architecture retrains on blocks of the model's block_size
    assert [r for r in _records(tmp_path / "again") if r["kind"] == "epoch"][-1]["dense_flops"] == last["flops"]


@pytest.mark.parametrize("setup, extra, words", [
    (lambda d: d.mkdir(), [], "train.bin does not exist"),
    (lambda d: _write(d, np.arange(10), np.arange(100)), [], "too few for one block of 32"),
    (lambda d: (_write(d, np.arange(100), np.arange(100)), (d / "val.bin").write_bytes(b"abc")), [], "odd number of bytes"),
    (lambda d: _write(d, np.arange(400), np.arange(100)), [], "ids up to 399 but the model's embedding has 256 rows"),
    (lambda d: _write(d, np.arange(100), np.arange(100)), ["--block-size", "64"], "longer than the model's block_size 32"),
])
def test_bad_token_data_is_one_line(capsys, tmp_path, setup, extra, words):
    setup(tmp_path / "d")
    code, out, err = run_cli(capsys, "prune-train", "--model", TINY, "--data", f"tokens:{tmp_path / 'd'}", *extra,
                             "--dense", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err


def test_analyze_and_export_take_token_inputs(capsys, tmp_path):
    code, out, err = run_cli(capsys, "analyze", "--model", TINY, "--input-shape", "2,16", "--input-dtype", "long",
                             "--verify", "--json")
    info = json.loads(out)
    assert code == 0 and info["verify"]["ok"], err
    mlp = [g for g in info["groups"] if any("mlp" in e for e in g["examples"])]
    assert mlp and all(g["prunable"] and g["exact"] and g["size"] == 128 for g in mlp)  # hidden units
    code, out, err = run_cli(capsys, "export", "--model", TINY, "--out", str(tmp_path / "g.onnx"), "--dynamic-batch")
    assert code == 0 and "onnxruntime OK" in out  # ptgraph:gpt defaults to token ids of its block length
    for argv, words in ((["--model", "ptgraph:resnet20", "--input-dtype", "long"], "has none; use --input-dtype float"),
                        (["--model", TINY, "--input-dtype", "float", "--input-shape", "2,16"], "--input-dtype long")):
        code, out, err = run_cli(capsys, "analyze", *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, err


class Killed(Exception):
    pass


def test_resume_mid_epoch_on_token_data_is_bit_identical(tmp_path, monkeypatch):
    from ptgraph.trainers import loop as loop_module
    from ptgraph.trainers.config import TrainConfig
    from ptgraph.trainers.loop import train

    def cfg(name):
        return TrainConfig(model=TINY, data="tokens:synthetic", epochs=3, steps_per_epoch=6, target_flops=0.7,
                           run_dir=str(tmp_path / name), tensorboard=False)

    train(cfg("a"))
    reference = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert reference["plans"] and reference["input_dtype"] == "long"
    original, calls = loop_module.Run.train_step, {"n": 0}

    def dying_step(self, x, y):
        calls["n"] += 1
        if calls["n"] == 9:  # in epoch 2
            raise Killed()
        return original(self, x, y)

    monkeypatch.setattr(loop_module.Run, "train_step", dying_step)
    with pytest.raises(Killed):
        train(cfg("b"))
    monkeypatch.setattr(loop_module.Run, "train_step", original)
    summary = train(cfg("b"), resume_dir=str(tmp_path / "b"))
    resumed = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert resumed["plans"] == reference["plans"]
    assert all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
