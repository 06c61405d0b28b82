"""PruneTrain under FSDP2 on the CPU: 2 gloo processes, each holding half of every parameter and of the optimizer
state, against one process on the same global batch: the same plans, the same losses, the same optimizer state
after a shrink (gathered), the self-check and its freezing."""
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("torch.distributed.fsdp")
if not hasattr(__import__("torch.distributed.fsdp", fromlist=["x"]), "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class StageNet(nn.Module):
    """Repeated blocks without BatchNorm: 2 ranks on half batches compute what 1 process computes."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(3)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(torch.relu(self.blocks(torch.relu(self.stem(x)))).mean((2, 3)))


def _gpt():
    from ptgraph.lm_models import gpt

    return gpt(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _batches(kind: str, steps: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if kind.startswith("gpt"):
        blocks = [torch.randint(0, 64, (batch, 17), generator=g) for _ in range(steps)]
        return [(b[:, :16], b[:, 1:]) for b in blocks]
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]


def _state(opt, module) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter tensors by parameter name, whole (gathered from the shards)."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                     for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.dim()}
    return out


def _train(kind: str, rank: int, world: int, steps: int = 16) -> dict:
    """The same run in one process (world 1) or sharded over `world` ranks, each on its share of the global batch."""
    import torch.distributed as dist

    from ptgraph.graph import trace
    from ptgraph.trainers import fsdp
    from ptgraph.trainers.prunetrain import PruneTrain

    torch.manual_seed(0)
    model = _gpt() if kind.startswith("gpt") else StageNet()
    data = _batches(kind, steps)
    source = trace(model, (data[0][0][:2],), capture="export") if kind == "gpt-export" else model
    pt = PruneTrain(source, (data[0][0][:2],), None, target_flops=0.5, total_steps=steps, prune_until=0.5,
                    reconfigurations=3)
    sharded = fsdp.shard(pt) if world > 1 else None
    module = sharded.module if sharded else pt.model
    opt = (torch.optim.AdamW(module.parameters(), lr=3e-3) if kind.startswith("gpt")
           else torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9))
    pt.optimizer = opt
    losses, plans, first_state = [], [], None
    for x, y in data:
        n = len(x) // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        out = module(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pt.after_step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
        if pt.reconfiguration_due():
            r = pt.reconfigure()
            module = sharded.module if sharded else module
            if r is not None:
                plans.append(r.plan.to_json())
                if first_state is None:
                    first_state = _state(opt, module)
    final = fsdp.full_state_dict(module) if sharded else {k: v.clone() for k, v in module.state_dict().items()}
    units = sum(type(m).__name__.startswith("FSDP") for m in module.modules())  # one per block's modules + root
    return {"losses": losses, "plans": plans, "share": pt.flops / pt.dense_flops, "state": first_state,
            "final": final, "note": pt.check_note, "units": units}


def _zero_branch(pt, channels) -> int:
    from test_guards import _zero_channels

    gid = [g.id for g in pt.analysis.groups if g.prunable and any(m.name == "a.weight" for m in g.members)][0]
    _zero_channels(pt, gid, channels)
    return gid


def _self_check(rank: int, world: int) -> dict:
    """A correct shrink passes the check under FSDP2; a deliberately broken rule (the cat's channels listed in
    reverse, as tests/test_guards.py breaks it) is caught: the group frozen, the sharded model and its optimizer state untouched, training goes on."""
    from toy_models import CatNet

    from ptgraph.passes import rules
    from ptgraph.passes.rules import slicing
    from ptgraph.trainers import fsdp
    from ptgraph.trainers.prunetrain import PruneTrain

    results = {}
    for broken in (False, True):
        saved = dict(rules.RULES)
        if broken:
            def reversed_cat(ctx):
                out = slicing.cat(ctx)
                out[1] = np.concatenate([ctx.type_of(n)[1] for n in ctx.arg(0, "tensors")][::-1])
                return out
            for target in (torch.cat, torch.concat, torch.concatenate):
                rules.RULES[target] = reversed_cat
        try:
            torch.manual_seed(0)
            x = torch.randn(4, 3, 8, 8)
            pt = PruneTrain(CatNet(), (x[:2],), None, penalty_ratio=0.5, threshold=1e-6)
            branch = _zero_branch(pt, [0, 1, 2])
            sharded = fsdp.shard(pt)
            opt = torch.optim.SGD(sharded.module.parameters(), lr=0.0, momentum=0.9)  # momentum, weights as they are
            pt.optimizer = opt
            sharded.module(x[rank * 2:rank * 2 + 2]).square().mean().backward()
            opt.step()
            opt.zero_grad()
            opt.param_groups[0]["lr"] = 0.1
            before = fsdp.full_state_dict(sharded.module)
            momentum = _state(opt, sharded.module)
            r = pt.reconfigure()
            after = fsdp.full_state_dict(sharded.module)
            results[broken] = {"shrunk": r is not None, "frozen": branch in pt.frozen, "note": pt.check_note,
                               "same": all(torch.equal(before[k], after[k]) for k in before) if not r else None,
                               "momentum": all(torch.equal(momentum[k]["momentum_buffer"], v["momentum_buffer"])
                                               for k, v in _state(opt, sharded.module).items()) if not r else None,
                               "planned_again": branch in pt.plan().keep}
            sharded.module(x[rank * 2:rank * 2 + 2]).square().mean().backward()  # it trains on
            opt.step()
        finally:
            rules.RULES.clear()
            rules.RULES.update(saved)
    return results


JOBS = {kind: (lambda r, w, kind=kind: _train(kind, r, w)) for kind in ("gpt", "cnn", "gpt-export")}
JOBS["self_check"] = _self_check


def _worker(rank: int, world: int, port: int, job: str, out: Path, args: tuple = ()) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = (_loop_job if job == "loop" else JOBS[job])(rank, world, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - the test reads what happened
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(job: str, out: Path, world: int = 2, args: tuple = ()) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, out, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
        if p.is_alive():
            p.kill()
    errors = [e.read_text() for e in sorted(out.glob("*.err"))]
    assert not errors, errors[0]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("kind", ["gpt", "cnn", "gpt-export"])
def test_two_sharded_ranks_match_one_process_plans_losses_and_optimizer_state(kind, tmp_path):
    """gpt-export: captured by torch.export, whose graph calls no module: each block becomes a called graph module
    (trainers/fsdp_units.py) and its own FSDP unit."""
    one = _train(kind, 0, 1)
    two = _spawn(kind, tmp_path)
    assert len(one["plans"]) >= 2 and one["note"] is None
    assert two[0]["plans"] == two[1]["plans"] == one["plans"]  # the same plan at every reconfiguration
    assert two[0]["share"] == pytest.approx(one["share"]) and one["share"] == pytest.approx(0.5, abs=0.05)
    np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=1e-4)
    assert two[0]["losses"] == two[1]["losses"]
    # each repeated block sharded on its own (its called modules, or the block itself), the root too, after the shrinks
    assert two[0]["units"] == 3 if kind == "gpt-export" else two[0]["units"] > 4
    state = two[0]["state"]  # Adam's moments or SGD's momentum right after the first shrink, gathered
    assert set(state) == set(one["state"]) and all(state.values())
    for name, tensors in one["state"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(state[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    # The final weights as a whole: a key bias has a zero gradient in exact arithmetic (softmax ignores it), and Adam
    # turns its float noise into full-size steps, so it alone may differ by lr-sized amounts.
    assert set(two[0]["final"]) == set(one["final"])
    a, b = (torch.cat([r["final"][k].flatten().double() for k in sorted(one["final"])]) for r in (two[0], one))
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_the_self_check_passes_correct_shrinks_and_freezes_a_broken_rule_under_fsdp(tmp_path):
    ranks = _spawn("self_check", tmp_path)
    assert ranks[0] == ranks[1]
    good, bad = ranks[0][False], ranks[0][True]
    assert good["shrunk"] and not good["frozen"] and good["note"] is None
    assert not bad["shrunk"] and bad["frozen"] and "would change the model" in bad["note"]
    assert bad["same"] and bad["momentum"] and not bad["planned_again"]


def test_shard_refuses_what_it_cannot_do_in_one_sentence():
    from ptgraph.errors import UserError
    from ptgraph.trainers import fsdp
    from ptgraph.trainers.prunetrain import PruneTrain

    pt = PruneTrain(StageNet(), (torch.randn(2, 3, 8, 8),), None, target_flops=0.5, total_steps=10)
    with pytest.raises(UserError, match="torchrun"):
        fsdp.shard(pt)
    assert fsdp.repeated_blocks(pt.model) == ["blocks.0", "blocks.1", "blocks.2"]


def _cli_cfg(run_dir: Path, **kw):
    from ptgraph.trainers.config import TrainConfig

    base = dict(model="ptgraph:gpt?n_embd=32&n_layer=2", data="tokens:synthetic", epochs=3, batch_size=4,
                steps_per_epoch=6, target_flops=0.5, run_dir=str(run_dir), tensorboard=False, device="cpu",
                dist_timeout=60.0, fsdp=True)
    return TrainConfig(**{**base, **kw})


def _loop_job(rank: int, world: int, out: Path, store_ports: list[int]) -> dict:
    """The CLI's loop under FSDP2: a whole run; a run stopped in its last epoch (both ranks, as torchrun stops the
    survivors of a kill) and resumed from its sharded checkpoint."""
    import ptgraph.trainers.loop as loop
    from ptgraph.trainers import checkpoint as ckpt

    import torch.distributed as dist

    dist.destroy_process_group()  # train() joins the group itself, through the test's store
    # a fresh store for every run, as every torchrun launch has: a group re-created on a used store can read the
    # previous group's addresses and hang in init_process_group
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_PORT=str(store_ports[0]))
    whole = loop.train(_cli_cfg(out / "whole"))
    step = loop.Run.train_step

    def dying(self, x, y):
        if self.pt.steps == 14:  # in epoch 3: the checkpoint of epoch 2 is the last one
            raise KeyboardInterrupt
        return step(self, x, y)

    loop.Run.train_step = dying
    os.environ["MASTER_PORT"] = str(store_ports[1])
    try:
        loop.train(_cli_cfg(out / "killed"))
    except KeyboardInterrupt:
        pass
    loop.Run.train_step = step
    stopped = ckpt.load(out / "killed")["epoch"]
    os.environ["MASTER_PORT"] = str(store_ports[2])
    resumed = loop.train(_cli_cfg(out / "killed"), resume_dir=str(out / "killed"))
    return {"whole": whole, "resumed": resumed, "stopped": stopped}


def test_the_cli_loop_under_fsdp_reaches_the_target_and_resumes_its_sharded_checkpoint(tmp_path):
    import torch.distributed as dist

    from ptgraph.trainers import checkpoint as ckpt

    stores = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) for _ in range(3)]  # one a run
    ranks = _spawn("loop", tmp_path / "ranks", args=(tmp_path, [s.port for s in stores]))
    whole, resumed = ranks[0]["whole"], ranks[0]["resumed"]
    assert whole["flops"] / whole["dense_flops"] == pytest.approx(0.5, abs=0.05)
    assert ranks[0]["stopped"] == 2 and resumed["flops"] == whole["flops"]
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    a, b = ckpt.load(tmp_path / "whole"), ckpt.load(tmp_path / "killed")
    assert a["plans"] == b["plans"] and len(a["plans"]) >= 2 and a["sharded"] == "checkpoint-e3.dcp"
    for name, value in a["model"].items():  # the last checkpoint holds the whole model as one ordinary file
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert [p.name for p in (tmp_path / "whole").glob("*.dcp")] == ["checkpoint-e3.dcp"]


@pytest.mark.parametrize("argv, message", [
    (["--fsdp"], "--fsdp shards the model across processes"),
    (["--fsdp", "--nproc-per-node", "1"], "--fsdp shards the model across processes"),
    (["--fsdp", "--compile"], "--fsdp with --compile is not supported"),
])
def test_bad_fsdp_combinations_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    from ptgraph.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["prune-train", "--model", "ptgraph:resnet20", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _diverge_job(rank: int, world: int, out: Path, store_port: int) -> dict:
    """A NaN in one rank's shard in epoch 2: every rank stops with the same one-line error, epoch 1's checkpoint kept."""
    import torch.distributed as dist

    import ptgraph.trainers.loop as loop
    from ptgraph.errors import UserError

    dist.destroy_process_group()
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_PORT=str(store_port))
    step = loop.Run.train_step

    def poisoned(self, x, y):
        if self.pt.steps == 8 and rank == 0:  # epoch 2 of 6-step epochs, between two reconfigurations
            with torch.no_grad():
                p = next(self.model.parameters())
                (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
        return step(self, x, y)

    loop.Run.train_step = poisoned
    try:
        loop.train(_cli_cfg(out / "run"))
        return {"error": None}
    except UserError as e:
        return {"error": str(e)}
    finally:
        loop.Run.train_step = step


JOBS["diverge"] = _diverge_job


def test_a_nan_in_one_shard_stops_every_rank_with_one_line(tmp_path):
    import torch.distributed as dist

    from ptgraph.trainers import checkpoint as ckpt

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ranks = _spawn("diverge", tmp_path / "ranks", args=(tmp_path, store.port))
    assert ranks[0]["error"] == ranks[1]["error"] and "training diverged in epoch 2" in ranks[0]["error"]
    assert "\n" not in ranks[0]["error"] and ckpt.load(tmp_path / "run")["epoch"] == 1


def _hf_job(rank: int, world: int, out: Path) -> dict:
    """A tiny Llama (GQA) pruned under FSDP2 with the config allocation, saved as a Hugging Face checkpoint."""
    from test_integration_hf import VOCAB, llama

    from ptgraph.integrations.hf import _first, _traceable, example_inputs, save_pruned_sharded
    from ptgraph.trainers import fsdp
    from ptgraph.trainers.prunetrain import PruneTrain

    torch.manual_seed(0)
    model = llama()
    with _traceable(model):
        pt = PruneTrain(model, example_inputs(model), None, target_flops=0.5, total_steps=12, prune_until=0.5,
                        reconfigurations=3, allocation="config")
    sharded = fsdp.shard(pt)
    opt = torch.optim.AdamW(sharded.module.parameters(), lr=3e-3)
    pt.optimizer = opt
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        tokens = torch.randint(0, VOCAB, (4, 17), generator=g)[rank * 2:rank * 2 + 2]
        logits = _first(sharded.module(tokens[:, :16]))
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        pt.after_step()
        if pt.reconfiguration_due():
            pt.reconfigure()
    probe = torch.arange(2, 18).unsqueeze(0)
    whole = sharded.whole_model()
    save_pruned_sharded(model, pt, str(out / "hf"))
    if whole is None:
        return {}
    with torch.no_grad():
        return {"logits": _first(whole.eval()(probe)), "share": pt.flops / pt.dense_flops, "plans": len(pt.plans),
                "units": sum(type(m).__name__.startswith("FSDP") for m in sharded.module.modules())}


JOBS["hf"] = _hf_job


def test_a_hugging_face_model_pruned_under_fsdp_saves_a_checkpoint_from_pretrained_loads(tmp_path):
    """save_pruned_sharded: every rank gathers, rank 0 writes a standard checkpoint of the pruned config; it reloads
    without a warning, computes what the gathered graph computes, and has about half the dense FLOPs (by torch)."""
    pytest.importorskip("transformers")
    from test_integration_hf import flops, llama, load_quietly

    import transformers as tf

    ranks = _spawn("hf", tmp_path / "ranks", args=(tmp_path,))
    reloaded = load_quietly(tf.AutoModelForCausalLM, tmp_path / "hf")
    probe = torch.arange(2, 18).unsqueeze(0)
    with torch.no_grad():
        assert (reloaded(probe).logits - ranks[0]["logits"]).abs().max() <= 1e-5
    assert ranks[0]["plans"] >= 2 and ranks[0]["units"] == 3  # each decoder layer its own unit, and the root
    share = flops(reloaded, probe) / flops(llama().eval(), probe)
    assert abs(share - 0.5) <= 0.05 and abs(ranks[0]["share"] - share) <= 0.05, share


def test_an_in_place_op_on_a_module_output_is_refused_under_fsdp():
    """FSDP2's backward hook sits on a unit's output; `y += x` on it would drop the hook and the gradients with it."""
    from ptgraph.trainers.fsdp import _inplace_on_module_output
    from ptgraph.trainers.prunetrain import PruneTrain

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            y.add_(x)  # fx traces `y += x` as an out-of-place add; a method call stays in place
            return self.b(y)

    pt = PruneTrain(InPlace(), (torch.randn(2, 4, 8),), None, target_flops=0.5, total_steps=10)
    assert "writes into the output of a" in _inplace_on_module_output(pt.model)

    class InPlaceRelu(InPlace):
        def forward(self, x):
            return self.b(nn.functional.relu(self.a(x), inplace=True))

    pt = PruneTrain(InPlaceRelu(), (torch.randn(2, 4, 8),), None, target_flops=0.5, total_steps=10)
    assert "writes into the output of a" in _inplace_on_module_output(pt.model)
    pt = PruneTrain(StageNet(), (torch.randn(2, 3, 8, 8),), None, target_flops=0.5, total_steps=10)
    assert _inplace_on_module_output(pt.model) is None


@settings(max_examples=8, deadline=None)
@given(n_layer=st.integers(2, 4), n_embd=st.sampled_from([16, 32]), n_head=st.sampled_from([2, 4]),
       width=st.integers(4, 12), cnn=st.booleans())
def test_called_blocks_compute_what_the_export_graph_computes(n_layer, n_embd, n_head, width, cnn):
    """trainers/fsdp_units.py on random GPTs and stage CNNs captured by torch.export: one called module per block,
    every parameter name kept, the same outputs in train and eval mode and the same gradients."""
    from ptgraph.graph import trace
    from ptgraph.lm_models import gpt
    from ptgraph.trainers.fsdp import _units, repeated_blocks
    from ptgraph.trainers.fsdp_units import with_called_blocks

    torch.manual_seed(0)
    if cnn:
        model, x = StageNet(width), torch.randn(2, 3, 8, 8)
    else:
        model, x = gpt(vocab_size=32, block_size=8, n_layer=n_layer, n_head=n_head, n_embd=n_embd), torch.randint(0, 32, (2, 8))
    gm = trace(model, (x,), capture="export").module
    blocks = repeated_blocks(gm)
    out = with_called_blocks(gm, blocks)
    assert out is not gm and len(_units(out)) == len(blocks) and not _units(gm)
    params = dict(gm.named_parameters())  # `out` is a copy: the same names and values
    assert dict(out.named_parameters()).keys() == params.keys()
    assert all(torch.equal(p, params[k]) for k, p in out.named_parameters())
    for mode in (True, False):
        gm.train(mode)
        out.train(mode)
        want, got = gm(x), out(x)
        want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = {}
    for module in (gm, out):
        module.zero_grad()
        y = module(x)
        (y[0] if isinstance(y, tuple) else y).square().mean().backward()
        grads[module is out] = {k: p.grad.clone() for k, p in module.named_parameters()}
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=0, atol=0, msg=k)
