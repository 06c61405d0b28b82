"""Hugging Face transformers built from configs (no download): captured by torch.export, heads and MLPs
prunable, shrink exact against the mask, the shrunk model trains and evaluates at other sizes."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from ptgraph import trace
from ptgraph.passes.groups import analyze_channels
from ptgraph.passes.plan import random_plan
from ptgraph.passes.shrink import count_params, keep_every_tensor, shrink
from ptgraph.passes.verify import verify

tf = pytest.importorskip("transformers")


def _tokens(batch: int, length: int) -> tuple:
    return (torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length)),)


def _images(batch: int, _: int) -> tuple:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


MODELS = {
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=64,
                                                      use_cache=False)), _tokens),
    "llama-gqa": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, use_cache=False)), _tokens),
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=128,
        max_position_embeddings=64)), _tokens),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, image_size=32,
        patch_size=8)), _images),
}


def _first(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return next(v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor))


@pytest.fixture(scope="module", params=list(MODELS))
def captured(request):
    build, inputs = MODELS[request.param]
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = trace(model, inputs(2, 16))
    return request.param, model, graph, inputs


def test_captured_by_export_with_heads_and_mlps_prunable(captured):
    name, _, graph, _ = captured
    assert graph.capture == "export"  # fx cannot trace their top level
    analysis = analyze_channels(graph)
    assert analysis.prunable_channel_fraction >= 0.5, name
    heads = [g for g in analysis.groups if g.prunable and g.exact and g.size in (2, 4)]
    assert heads, f"{name}: no attention-head group"
    if name == "llama-gqa":  # 2 kv heads, each coupling 2 of the 4 q heads: 32 q rows, 16 k rows per channel
        g = heads[0]
        rows = {m.name.rsplit(".", 2)[-2]: len(m.positions) for m in g.members if m.axis == 0}
        assert g.size == 2 and rows["q_proj"] == 64 and rows["k_proj"] == 32 and rows["v_proj"] == 32


def test_shrink_matches_mask_and_removes_parameters(captured):
    name, _, graph, inputs = captured
    graph = copy.deepcopy(graph)
    result = verify(analyze_channels(graph), inputs(2, 16), ratio=0.3)
    assert result.ok and result.rel_err <= 1e-4, (name, result)
    graph = copy.deepcopy(captured[2])
    analysis = analyze_channels(graph)
    before = count_params(graph.module)
    plan = keep_every_tensor(analysis, random_plan(analysis.groups, 0.3, seed=1, exact_only=False))
    shrink(analysis, plan)
    assert count_params(graph.module) <= 0.85 * before, name


@pytest.mark.parametrize("ratio", [0.6, 0.95])
def test_a_shrunk_capture_analyses_like_the_shrunk_analysis(captured, ratio):
    """PruneTrain's FLOPs bisection re-analyses shrunk copies: heads down to one (a single kv head of a
    grouped-query pair) must still be found as heads."""
    name, _, graph, _ = captured
    graph = copy.deepcopy(graph)
    analysis = analyze_channels(graph)
    shrink(analysis, keep_every_tensor(analysis, random_plan(analysis.groups, ratio, seed=3, exact_only=False)))
    again = analyze_channels(copy.deepcopy(graph))
    assert [(g.id, g.size, g.prunable) for g in again.groups] == [(g.id, g.size, g.prunable) for g in analysis.groups], name


def test_shrunk_model_trains_and_evaluates_at_other_sizes(captured):
    name, model, graph, inputs = captured
    graph = copy.deepcopy(graph)
    analysis = analyze_channels(graph)
    gm = graph.module
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    gm.train()
    _first(gm(*inputs(2, 16))).float().pow(2).mean().backward()
    opt.step()
    shrink(analysis, keep_every_tensor(analysis, random_plan(analysis.groups, 0.3, seed=2, exact_only=False)), opt)
    for batch, length in ((2, 16), (3, 12)):  # batch and sequence are dynamic in the capture
        x = inputs(batch, length)
        opt.zero_grad()
        _first(gm(*x)).float().pow(2).mean().backward()
        opt.step()
        gm.eval()
        with torch.no_grad():
            a, b = _first(gm(*x)), _first(gm(*x))
        assert torch.isfinite(a).all() and torch.equal(a, b), name  # eval: no dropout
        gm.train()


def test_train_and_eval_modes_differ_only_by_dropout():
    model = MODELS["gpt2"][0]()
    x = _tokens(2, 16)
    graph = trace(model, x)
    gm = graph.module
    gm.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(_first(gm(*x)), _first(model(*x)), atol=1e-5)
    gm.train()
    with torch.no_grad():
        assert not torch.allclose(_first(gm(*x)), _first(gm(*x)))  # dropout on in training mode


def test_torchvision_vit_stream_and_heads_prunable_through_fx():
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    graph = trace(model, x)
    assert graph.capture == "fx" and len(graph.opened) == 2  # nn.MultiheadAttention traced through its decomposition
    analysis = analyze_channels(graph)
    stream = next(g for g in analysis.groups if any(m.name == "conv_proj.weight" and m.axis == 0 for m in g.members))
    assert stream.prunable and stream.size == 64
    assert any(m.name.endswith("self_attention.in_proj_weight") and m.axis == 1 for m in stream.members)
    heads = [g for g in analysis.groups if any(m.name.endswith("in_proj_weight") and m.axis == 0 for m in g.members)]
    assert [g.size for g in heads] == [4, 4] and all(g.prunable and g.exact for g in heads)
    assert verify(analysis, (x,), ratio=0.3).ok


def test_pruned_language_model_exports_to_onnx(captured):
    name, _, graph, inputs = captured
    if name != "llama-gqa":  # one LM (rotary, grouped kv heads) is enough for the exporter path
        pytest.skip("covered by llama-gqa")
    pytest.importorskip("onnxruntime")
    from ptgraph.export import export

    graph = copy.deepcopy(graph)
    analysis = analyze_channels(graph)
    shrink(analysis, keep_every_tensor(analysis, random_plan(analysis.groups, 0.3, seed=1, exact_only=False)))
    graph.module.eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = export(graph.module, inputs(2, 16), f"{tmp}/lm.onnx")
    assert result.ok and result.rel_err <= 1e-4, result


def test_cli_prune_trains_an_hf_llama_on_tokens_and_exports_it(tmp_path, monkeypatch, capsys):
    """The CLI path end to end on a model of the user's own code: capture by torch.export, next-token
    training to a FLOPs target, and ONNX export of the run (which re-captures and replays the plans)."""
    pytest.importorskip("onnxruntime")
    from ptgraph.cli import main

    (tmp_path / "hf_user_models.py").write_text(
        "import transformers as tf\n"
        "def llama():\n"
        "    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,\n"
        "        hidden_size=32, intermediate_size=64, vocab_size=256, max_position_embeddings=64, use_cache=False))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    code = main(["prune-train", "--model", "hf_user_models:llama", "--data", "tokens:synthetic", "--block-size", "32",
                 "--target-flops", "0.7", "--epochs", "1", "--steps-per-epoch", "8", "--run-dir", str(run),
                 "--no-tensorboard"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in summary if "val_ppl" in r][-1]
    assert math.isfinite(epoch["val_ppl"])
    assert "FLOPs/img" in out and "val ppl" in out
    code = main(["export", str(run), "--out", str(tmp_path / "lm.onnx")])
    out, err = capsys.readouterr()
    assert code == 0 and "onnxruntime OK" in out, err
