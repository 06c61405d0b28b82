"""Planning and checking without copies of the model (docs/DESIGN_NOTES.md, "Scale").

1. A plan's FLOPs predicted from the channel counts it leaves equal the FLOPs counted after the real shrink
   (hypothesis: random CNN architectures and plans; Hugging Face transformers and random plans).
2. The self-check fused with the shrink (`checked_shrink`) gives the model, the gradients and the optimizer
   state that `shrink` gives; when it fails, and after the check that always undoes (`shrunk_and_masked`),
   the model, its attributes, its graph and its analysis are exactly as they were.
3. A model on the meta device is traced, analysed and planned without weights; PruneTrain and `analyze --verify`
   say in one line that they need values.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptgraph
from ptgraph.cli import main
from ptgraph.cost import forward_flops
from ptgraph.errors import UserError
from ptgraph.passes import PrunePlan, analyze_channels, keep_every_tensor, mask, random_plan, shrink
from ptgraph.passes.predict import predicted_flops
from ptgraph.passes.trial import checked_shrink, masked_output
from ptgraph.passes.verify import flat_output, shrink_error
from ptgraph.trainers.planning import shape_plan
from strategies import architectures
from test_guards import _reversed_cat
from test_properties import SETTINGS, drawn_plans, examples, pruning_groups
from toy_models import CatNet

tf = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(analysis) -> dict:
    gm = analysis.graph.module
    attrs = {name: {k: v for k, v in vars(m).items() if isinstance(v, (int, tuple, list)) and not k.startswith("_")}
             for name, m in gm.named_modules()}
    return {"state": {k: v.clone() for k, v in gm.state_dict().items()}, "code": gm.code, "attrs": attrs,
            "alive": analysis.flow.alive.copy(), "groups": [(g.id, g.size) for g in analysis.groups],
            "params": {n: id(p) for n, p in gm.named_parameters()}}


def _assert_same(analysis, snap: dict) -> None:
    now = _snapshot(analysis)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now["state"][k].shape == v.shape and torch.equal(now["state"][k], v), k
    assert now["code"] == snap["code"] and now["attrs"] == snap["attrs"] and now["groups"] == snap["groups"]
    assert np.array_equal(now["alive"], snap["alive"]) and now["params"] == snap["params"]


def _traced(arch):
    model = arch.build().eval()
    x = arch.inputs()
    graph = ptgraph.trace(model, (x,))
    return graph, analyze_channels(graph), x


@settings(max_examples=examples(25), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_predicted_flops_equal_the_shrunk_models(arch, data):
    _, analysis, _ = _traced(arch)
    groups = [g for g in analysis.groups if g.prunable and g.size >= 2]
    plan = keep_every_tensor(analysis, data.draw(drawn_plans(groups)))
    predicted = predicted_flops(analysis, plan)
    shrink(analysis, plan)
    assert predicted == forward_flops(analysis.graph.module)


HF_MODELS = {
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, use_cache=False)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=64,
                                                     use_cache=False)),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=128,
        max_position_embeddings=64)),
}


@pytest.fixture(scope="module")
def hf_graphs():
    """Each model traced once; every example shrinks a deep copy."""
    out = {}
    for name, build in HF_MODELS.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = ptgraph.trace(build().eval(), (torch.randint(0, 128, (2, 16)),))
    return out


@settings(max_examples=examples(12), **SETTINGS)
@given(name=st.sampled_from(sorted(HF_MODELS)), ratio=st.floats(0.05, 0.8), seed=st.integers(0, 2**16))
def test_predicted_flops_equal_the_shrunk_transformers(hf_graphs, name, ratio, seed):
    graph = copy.deepcopy(hf_graphs[name])
    analysis = analyze_channels(graph)
    plan = keep_every_tensor(analysis, random_plan(analysis.groups, ratio, seed))
    assert plan.keep
    predicted = predicted_flops(analysis, plan)
    shrink(analysis, plan)
    assert predicted == forward_flops(graph.module)


def _trained_twins(arch):
    """Two identical traced models with identical momentum (one SGD step), to shrink two ways."""
    graph, analysis, x = _traced(arch)
    twins = []
    for _ in range(2):
        g = copy.deepcopy(graph)
        a = analyze_channels(g)
        opt = torch.optim.SGD(g.module.parameters(), lr=0.1, momentum=0.9)
        g.module.train()
        g.module(x).square().mean().backward()
        opt.step()
        twins.append((a, opt))
    return twins, x


@settings(max_examples=examples(20), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_checked_shrink_gives_what_shrink_gives(arch, data):
    (checked, opt_c), (plain, opt_p) = _trained_twins(arch)[0]
    plan = keep_every_tensor(plain, data.draw(drawn_plans(pruning_groups(plain))))
    if not plan.keep:
        return
    x = arch.inputs()
    report, err, seconds = checked_shrink(checked, plan, (x,), flat_output, 1e-4, opt_c)
    expected = shrink(plain, plan, opt_p)
    assert report is not None and err <= 1e-4 and seconds >= 0, err
    assert report.groups == expected.groups and report.params_after == expected.params_after
    assert checked.graph.module.training  # the check's eval mode is undone
    params_c, params_p = dict(checked.graph.module.named_parameters()), dict(plain.graph.module.named_parameters())
    for name, p in params_p.items():
        q = params_c[name]
        assert torch.equal(q, p) and torch.equal(q.grad, p.grad), name
        assert torch.equal(opt_c.state[q]["momentum_buffer"], opt_p.state[p]["momentum_buffer"]), name
    assert forward_flops(checked.graph.module) == forward_flops(plain.graph.module)


@settings(max_examples=examples(20), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_the_undoing_check_leaves_the_model_exactly_as_it_was(arch, data):
    _, analysis, x = _traced(arch)
    plan = keep_every_tensor(analysis, data.draw(drawn_plans(pruning_groups(analysis))))
    if not plan.keep:
        return
    snap = _snapshot(analysis)
    assert shrink_error(analysis, plan, (x,)) <= 1e-4
    _assert_same(analysis, snap)


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=architectures(), data=st.data())
def test_masking_in_place_computes_what_a_masked_copy_does_and_is_undone(arch, data):
    _, analysis, x = _traced(arch)
    plan = keep_every_tensor(analysis, data.draw(drawn_plans(pruning_groups(analysis))))
    if not plan.keep:
        return
    snap = _snapshot(analysis)
    with torch.no_grad():
        want = flat_output(mask(copy.deepcopy(analysis.graph.module), analysis, plan)(x))
    got = masked_output(analysis, plan, (x,), flat_output)
    assert torch.equal(got, want)
    _assert_same(analysis, snap)


def test_a_failing_fused_check_undoes_everything(monkeypatch):
    _reversed_cat(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    graph = ptgraph.trace(CatNet(), (x,))
    analysis = analyze_channels(graph)
    opt = torch.optim.SGD(graph.module.parameters(), lr=0.1, momentum=0.9)
    graph.module(x).square().mean().backward()
    opt.step()
    branch = [g.id for g in analysis.groups if g.prunable and any(m.name == "a.weight" for m in g.members)][0]
    plan = keep_every_tensor(analysis, PrunePlan({branch: (3, 4, 5, 6, 7)}))
    snap = _snapshot(analysis)
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in graph.module.named_parameters()}
    report, err, _ = checked_shrink(analysis, plan, (x,), flat_output, 1e-4, opt)
    assert report is None and err > 1e-4
    _assert_same(analysis, snap)
    for n, p in graph.module.named_parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum[n]) and p.grad.shape == p.shape


def _small_llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, use_cache=False))


def test_a_meta_model_is_planned_without_weights_and_its_plan_prices_the_real_shrink():
    ids = torch.randint(0, 128, (1, 16))
    with torch.device("meta"):
        meta = _small_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ptgraph.trace(meta, (ids,))
    analysis = analyze_channels(graph)
    assert all(p.is_meta for p in graph.module.parameters())
    plan, flops = shape_plan(analysis, 0.5)
    dense = forward_flops(graph.module)
    assert 0.45 * dense <= flops <= 0.5 * dense * 1.05 and plan.keep
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = ptgraph.trace(_small_llama(), (ids,))
    real_analysis = analyze_channels(real)
    assert [(g.id, g.size) for g in real_analysis.groups] == [(g.id, g.size) for g in analysis.groups]
    shrink(real_analysis, plan)
    # within 0.2%: torch.export keeps two `contiguous` copies on meta tensors that it drops on CPU ones
    assert abs(forward_flops(real.module) - flops) <= 0.002 * flops
    with pytest.raises(UserError, match="meta device") as e:
        from ptgraph.trainers import PruneTrain
        PruneTrain(graph, (ids,), None, target_flops=0.5, total_steps=10)
    assert "\n" not in str(e.value)


def test_analyze_plans_a_meta_model_and_refuses_to_verify_it(capsys):
    assert main(["analyze", "--model", "ptgraph:resnet20", "--meta", "--target-flops", "0.5", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert abs(info["plan"]["flops"] / info["flops"] - 0.5) < 0.05 and info["plan"]["params"] < info["params"]
    assert main(["analyze", "--model", "ptgraph:resnet20", "--meta", "--verify"]) == 2
    err = capsys.readouterr().err
    assert "--meta" in err and err.count("\n") == 1
