"""`prune-train --compile`: every reconfiguration is a fresh compile, so dynamo's recompile limit (lowered to 2 here,
with a hard error on reaching it) is never reached however many shrinks there are; the steps after the last shrink
run through a graph compiled for the final shapes; and a frame dynamo runs eagerly anyway is said in one line."""
import functools
import re

import pytest
import torch

from ptgraph.trainers.compiling import Compiler, eager_fallbacks
from ptgraph.trainers.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


@pytest.fixture
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def _counting_compile(monkeypatch) -> list[dict]:
    """torch.compile with a backend that records each graph it is given and counts the calls that run it."""
    graphs: list[dict] = []

    def backend(gm, example_inputs):
        entry = {"shapes": {tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)}, "calls": 0}
        graphs.append(entry)

        def run(*args):
            entry["calls"] += 1
            return gm.forward(*args)
        return run

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return graphs


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(model="toy_models:plain_net", data="synthetic:easy", epochs=3, batch_size=16,
                                 steps_per_epoch=6, target_flops=0.5, prune_until=0.67, reconfigurations=4, lr=0.1,
                                 schedule="cosine", run_dir=str(tmp_path / "run"), tensorboard=False, device="cpu",
                                 compile=True), **kw})


def test_the_cli_loop_compiles_afresh_after_every_reconfiguration_and_never_runs_eager(tmp_path, monkeypatch):
    from ptgraph.trainers.loop import Run, train

    graphs = _counting_compile(monkeypatch)
    runs = []
    init = Run.__init__
    monkeypatch.setattr(Run, "__init__", lambda self, *a, **k: (init(self, *a, **k), runs.append(self))[0])
    cfg = _cfg(tmp_path)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):  # (monkeypatch's undo
        summary = train(cfg)                                                                # deletes the attribute)
    run = runs[0]
    assert summary["reconfigurations"] >= 3  # more shrinks than the limit
    assert abs(summary["flops"] / summary["dense_flops"] - 0.5) <= 0.05
    assert run.compiler.compiles == summary["reconfigurations"] + 1
    final = {tuple(p.shape) for p in run.model.parameters()}
    last = [g for g in graphs if final <= g["shapes"]]  # compiled for the final shapes (parameters are graph inputs)
    steps_after = 18 - max(r["step"] for r in run.records if r["kind"] == "reconfig")
    assert last and sum(g["calls"] for g in last) >= steps_after  # the last steps (and evaluation) ran compiled
    assert len({frozenset(g["shapes"]) for g in graphs}) >= summary["reconfigurations"] + 1
    assert not [r for r in run.records if r["kind"] == "compile"] and eager_fallbacks() == 0


@torch._dynamo.config.patch(recompile_limit=1)
def test_a_frame_dynamo_runs_eagerly_is_said_once():
    compiler = Compiler({"backend": "eager", "dynamic": False})
    f = compiler(torch.nn.Linear(3, 2))
    f(torch.randn(2, 3))
    assert compiler.eager_note() is None
    f(torch.randn(5, 3))  # a second shape of the same frame: past the limit of 1, dynamo runs it eagerly
    note = compiler.eager_note()
    assert note and re.search(r"runs part of the model eagerly.*recompile_limit = 1\)", note)
    assert compiler.eager_note() is None  # said once


def test_the_cli_loop_says_when_dynamo_runs_the_model_eagerly(tmp_path, monkeypatch):
    """With a limit of 1, evaluation's recompile (eval mode, a smaller last batch) is one too many; and on the CPU
    the run starts with a note on what each reconfiguration's compile costs."""
    import json

    from rich.console import Console

    from ptgraph.trainers.loop import train

    _counting_compile(monkeypatch)
    console = Console(record=True, width=300)
    with torch._dynamo.config.patch(recompile_limit=1):
        train(_cfg(tmp_path, epochs=1), console=console)
    text = console.export_text()
    said = [line for line in text.splitlines() if "eagerly" in line]
    assert len(said) == 1 and "recompile_limit = 1)" in said[0]
    assert "note: --compile on the CPU compiles the training graph anew after every reconfiguration" in text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["note"] for r in records if r["kind"] == "compile"] == [said[0]]
