"""Hugging Face zoo sweep: every transformers architecture for causal LM, image and sequence classification.

One model class per model type, in the order of transformers' auto mappings: every type of
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, then the types of `MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES` and
`MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES` not already covered. Each is built with random weights from
its config class's defaults shrunk generically (`tiny_changes`: the common size attributes, nested sub-configs
and per-stage lists; nothing downloaded, no per-model table), counted on the meta device first (over
`MAX_PARAMS` it is skipped), run on its own dummy input, then captured with `ptgraph.trace`, analysed, verified
(`verify(..., ratio=0.3)`: shrink against mask) and, unless --no-onnx, exported to ONNX and checked in
onnxruntime. Each model runs in its own subprocess (this module is its own worker), one at a time.

    python tools/zoo_hf.py --raw runs/zoo_hf.jsonl --reuse          # every type, resumable; writes docs/ZOO_HF.md
    python tools/zoo_hf.py --models gpt2,llama --out /tmp/zoo_hf.md
    python tools/zoo_hf.py --worker gpt2                            # one model in this process, JSON on stdout

Classes: *verified*; *WRONG* (verify over tolerance or a parameter count other than predicted, an error
raised inside ptgraph's trace, analysis or shrink, or random numbers reaching the captured graph's eval output
where the model's own eval output has none: verify would compare two random draws); *not capturable*
(torch.export itself refuses the model: its capture is rerun without ptgraph to tell the two apart); *not built*
(the tiny config cannot be built or the model cannot run its own forward on the dummy input); *too large* (after
shrinking); *timed out*.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import (REL_TOLERANCE, ROOT, _largest_frozen, cell, fmt_int, fmt_pct, fmt_shares, last_line, machine,  # noqa: E402
                 new_sweep, records, sweep, write_raw, chosen_models)

MAX_PARAMS = 30_000_000  # over this after shrinking: skipped as too large
RECORD = "zoo_hf record: "  # prefix of the worker's JSON line on stdout (the model may print too)
STAGE = "zoo_hf stage: "  # prefix of the worker's progress lines on stderr (where a crash or timeout happened)
PTGRAPH_STAGES = ("trace", "analyze", "verify")  # an error here is ptgraph's
NOT_REACHED = "not reached"  # --budget ran out before the model was started (never saved)
STATUSES = ("verified", "WRONG", "not capturable", "not built", "too large", "timed out")

LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
          "num_encoder_layers", "num_decoder_layers")
SIZES: dict[str, int] = {  # attribute -> tiny value (only ever shrunk, never grown)
    **{k: 2 for k in LAYERS},
    **{k: 64 for k in ("hidden_size", "n_embd", "d_model", "embedding_size")},
    **{k: 128 for k in ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
                        "moe_intermediate_size", "shared_expert_intermediate_size", "hidden_dim")},
    **{k: 4 for k in ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                      "decoder_attention_heads")},
    "num_key_value_heads": 2,
    **{k: 128 for k in ("max_position_embeddings", "n_positions")},
    **{k: 4 for k in ("num_experts", "num_local_experts", "n_routed_experts")},
    "num_experts_per_tok": 2,
    # multi-head latent attention (DeepSeek-style): per-head and low-rank sizes, a sparse indexer's heads
    **{k: 16 for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "index_head_dim")},
    **{k: 32 for k in ("kv_lora_rank", "q_lora_rank")},
    "index_n_heads": 4,
}
POSITIONS = ("max_position_embeddings", "n_positions")
WIDTHS = {k for k, v in SIZES.items() if v >= 64 and k not in POSITIONS}  # scaled up when the tiniest fails
HEAD_DIMS = ("head_dim", "d_kv")  # explicit per-head sizes: set to the new width / heads
WIDTH_LISTS = ("hidden_sizes", "embed_dims", "embed_dim", "dims", "widths", "neck_hidden_sizes")
DEPTH_LISTS = ("depths", *LAYERS)  # per-stage block counts: each at most 2
VOCAB = 256
ATTEMPTS = ((1, True, False), (1, False, False), (4, True, False), (1, True, True))  # scale, vocab, kv heads
IMAGE = 64


# -- which models ------------------------------------------------------------------------------
def hf_models() -> list[tuple[str, str, str]]:
    """(model type, class name, task) for every type of the three auto mappings, the first mapping's class."""
    from transformers.models.auto import modeling_auto as auto

    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for task, mapping in (("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("image-classification", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
                          ("sequence-classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)):
        for model_type, names in mapping.items():
            if model_type not in seen:
                seen.add(model_type)
                out.append((model_type, names if isinstance(names, str) else names[0], task))
    return out


# -- tiny config -------------------------------------------------------------------------------
def _shrunk_width_list(values: list, widest: int = 64) -> list:
    """A per-stage width list divided by the largest power of two that keeps every width an integer (so head
    counts per stage still divide it) and the widest stage at `widest` or more."""
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        return values
    f = 1
    while max(values) // (2 * f) >= widest and all(v % (2 * f) == 0 for v in values):
        f *= 2
    return [v // f for v in values]


def _token_ids(config: Any) -> dict[str, Any]:
    """Special token ids at or over VOCAB, moved to distinct ids at the top of the tiny vocabulary."""
    changes: dict[str, Any] = {}
    free = iter(range(VOCAB - 1, VOCAB // 2, -1))
    moved: dict[int, int] = {}

    def move(i: Any) -> Any:
        if isinstance(i, int) and i >= VOCAB:
            moved.setdefault(i, next(free))
            return moved[i]
        return i

    for key, value in vars(config).items():
        if key.endswith(("_token_id", "_token_index")) and value is not None:
            new = [move(v) for v in value] if isinstance(value, list) else move(value)
            if new != value:
                changes[key] = new
    return changes


def _attrs(config: Any) -> dict[str, Any]:
    """The config's attributes under their common names too (`attribute_map`: XLM's emb_dim is hidden_size)."""
    attrs = dict(vars(config))
    for alias, real in (getattr(config, "attribute_map", {}) or {}).items():
        if real in attrs and alias not in attrs:
            attrs[alias] = attrs[real]
    return attrs


def tiny_changes(config: Any, scale: int = 1, shrink_vocab: bool = True, kv_as_default: bool = False
                 ) -> dict[str, Any]:
    """The constructor arguments that make `config` (a config class's defaults) tiny: every size attribute
    present under a common name (widths times `scale`), per-stage lists (length kept), per-layer lists cut to
    the new depth, the image size, the vocabulary (special ids moved into it), and the same for every nested
    sub-config. Keys are the config's own names (an alias is passed as what it maps to). `kv_as_default`:
    as many kv heads as query heads where the defaults have as many (latent attention requires it)."""
    from transformers import PretrainedConfig

    attrs = _attrs(config)
    real = getattr(config, "attribute_map", {}) or {}
    changes: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        changes[real.get(key, key)] = value

    for key, tiny in SIZES.items():
        value = attrs.get(key)
        tiny = tiny * scale if key in WIDTHS else tiny
        if isinstance(value, int) and not isinstance(value, bool) and value > tiny:
            put(key, tiny)
    heads0 = attrs.get("num_attention_heads")
    if kv_as_default and isinstance(heads0, int) and attrs.get("num_key_value_heads") == heads0:
        put("num_key_value_heads", changes.get(real.get("num_attention_heads", "num_attention_heads"), heads0))
    for key in WIDTH_LISTS:
        if isinstance(attrs.get(key), list):
            put(key, _shrunk_width_list(attrs[key], 64 * scale))
    for key in DEPTH_LISTS:
        if isinstance(attrs.get(key), list) and all(isinstance(v, int) for v in attrs[key]):
            put(key, [min(v, 2) for v in attrs[key]])
    layers = next((attrs[k] for k in LAYERS if isinstance(attrs.get(k), int)), None)
    if layers and layers > 2:  # per-layer lists (layer_types, ...) follow the depth
        for key, value in vars(config).items():
            if isinstance(value, list) and len(value) == layers and real.get(key, key) not in changes:
                changes[key] = value[:2]
    width = next((changes[real.get(k, k)] for k in ("hidden_size", "d_model", "n_embd")
                  if real.get(k, k) in changes), None)
    heads = next((changes.get(real.get(k, k), attrs[k]) for k in ("num_attention_heads", "n_head", "n_heads",
                                                                  "encoder_attention_heads")
                  if isinstance(attrs.get(k), int)), None)
    rope = changes.get("qk_rope_head_dim")
    for key in HEAD_DIMS:  # latent attention: head_dim is the rotary part, the q/k head that and the rest
        if isinstance(attrs.get(key), int) and rope:
            put(key, rope if key == "head_dim" else attrs[key])
        elif isinstance(attrs.get(key), int) and width and heads and width // heads < attrs[key]:
            put(key, width // heads)
    if rope and isinstance(attrs.get("qk_head_dim"), int):
        put("qk_head_dim", rope + changes.get("qk_nope_head_dim", attrs.get("qk_nope_head_dim") or 0))
    size = attrs.get("image_size")
    if isinstance(size, int) and size > IMAGE:
        put("image_size", IMAGE)
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > IMAGE for s in size):
        put("image_size", [IMAGE, IMAGE])
    if shrink_vocab:
        for key, value in attrs.items():
            if key.endswith("vocab_size") and isinstance(value, int) and value > VOCAB:
                put(key, VOCAB)
        if isinstance(attrs.get("vocab_size"), int) and attrs["vocab_size"] > VOCAB:
            changes.update(_token_ids(config))
    if "use_cache" in attrs:
        changes["use_cache"] = False
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = attrs.get(key)
        if isinstance(sub, PretrainedConfig):
            sub_changes = tiny_changes(sub, scale, shrink_vocab, kv_as_default)
            if sub_changes:
                changes[key] = type(sub)(**{**_init_kwargs(sub), **sub_changes})
    return changes


def _init_kwargs(config: Any) -> dict[str, Any]:
    """What a sub-config was built with beyond its class defaults (a composite config may set its own)."""
    try:
        return config.to_diff_dict()
    except Exception:  # noqa: BLE001 - some configs cannot diff themselves: start from the defaults
        return {}


def tiny_configs(config_cls: type, seq_classification: bool) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Tiny configs of `config_cls`, smallest first: widths x1, the vocabulary kept (where the config refuses
    the tiny one), widths x4, kv heads as in the defaults; raises ValueError with the first refusal when none
    can be built."""
    default = config_cls()
    errors = []
    for scale, shrink_vocab, kv_as_default in ATTEMPTS:
        changes = tiny_changes(default, scale, shrink_vocab, kv_as_default)
        if seq_classification and getattr(default, "pad_token_id", 0) is None:  # batch 2 needs a pad id
            vocab = changes.get("vocab_size") or getattr(default, "vocab_size", None) or VOCAB
            changes["pad_token_id"] = vocab - 1
        try:
            config = config_cls(**changes)
        except Exception as e:  # noqa: BLE001
            errors.append(_one_line(e))
            continue
        yield config, changes
    if len(errors) == len(ATTEMPTS):
        raise ValueError("config: " + errors[0])


def _one_line(e: BaseException) -> str:
    """Type and first line of an error; with the next line when the first only announces it (`...:`)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


def _describe(changes: dict[str, Any]) -> str:
    """The changes, short: sub-configs by their own changes."""
    parts = []
    for k, v in changes.items():
        if hasattr(v, "to_diff_dict"):
            parts.append(f"{k}=<{type(v).__name__}>")
        elif k != "use_cache":
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def count_on_meta(cls: type, config: Any) -> int | None:
    """Parameter count without allocating (None when the model cannot be built on the meta device)."""
    import torch

    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception:  # noqa: BLE001 - counted after the real build instead
        return None
    return sum(p.numel() for p in model.parameters())



# -- inputs ------------------------------------------------------------------------------------
def _sub(config: Any, key: str) -> Any:
    """`key` of the config, else of its text or vision sub-config (a composite config keeps sizes there)."""
    for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        value = getattr(c, key, None) if c is not None else None
        if value is not None:
            return value
    return None


def _special_ids(config: Any) -> set[int]:
    """Every special token id of the config and its sub-configs (kept out of the random ids)."""
    out: set[int] = set()
    for c in (config, getattr(config, "text_config", None)):
        for key, value in (vars(c).items() if c is not None else ()):
            if key.endswith(("_token_id", "_token_index")):
                out.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return out


def _vocab(model: Any, config: Any) -> int:
    """Rows of the input embedding (what ids may be), else the config's vocabulary."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    except Exception:  # noqa: BLE001 - not every model exposes its embedding
        pass
    return int(_sub(config, "vocab_size") or VOCAB)


class Keywords:
    """Builds a module that calls `model(name=arg, ...)`: a forward whose second parameter is not the
    attention mask still gets its mask by name, while ptgraph sees positional inputs only."""

    @staticmethod
    def wrap(model: Any, names: tuple[str, ...]) -> Any:
        from torch import nn

        class _ByName(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> Any:
                return self.model(**dict(zip(names, args)))

        wrapped = _ByName()
        wrapped.config = model.config
        return wrapped


def input_attempts(model: Any, config: Any, task: str, seed: int) -> list[tuple[str, Any, tuple]]:
    """(description, module to run, inputs) to try in order: images of the config's size, or random token ids
    (batch 2, length 16, no special ids), then ending in the eos id, then with an attention mask."""
    import inspect

    import torch

    gen = torch.Generator().manual_seed(seed)
    images = model.main_input_name == "pixel_values" or (task == "image-classification"
                                                          and model.main_input_name != "input_ids")
    if images:  # ImageGPT classifies images given as ids of colour clusters
        size = _sub(config, "image_size") or IMAGE
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = _sub(config, "num_channels") or 3
        return [(f"{model.main_input_name} 1x{channels}x{h}x{w}", model,
                 (torch.randn(1, channels, h, w, generator=gen),))]
    vocab = _vocab(model, config)
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or [0])
    ids = allowed[torch.randint(0, len(allowed), (2, 16), generator=gen)]
    eos = _sub(config, "eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    with_eos = ids.clone()
    if isinstance(eos, int) and 0 <= eos < vocab:
        with_eos[:, -1] = eos
    mask = torch.ones_like(ids)
    params = list(inspect.signature(model.forward).parameters)
    masked = model if params[1:2] == ["attention_mask"] else Keywords.wrap(model, (params[0], "attention_mask"))
    name = f"{model.main_input_name} 2x16"
    out = [(name, model, (ids,)), (name + " eos", model, (with_eos,)),
           (name + " +mask", masked, (ids, mask)), (name + " eos +mask", masked, (with_eos, mask))]
    return out if isinstance(eos, int) else [out[0], out[2]]


def _runs(module: Any, inputs: tuple) -> str | None:
    """None when the module runs its forward on `inputs` in eval and in train mode (ptgraph captures in
    train mode), else why not."""
    import torch

    try:
        with torch.no_grad():
            module.eval()(*inputs)
            module.train()(*inputs)
        return None
    except Exception as e:  # noqa: BLE001 - the model's own failure, recorded as not runnable
        return _one_line(e)


# -- the worker --------------------------------------------------------------------------------
class Outcome(Exception):
    """Ends the worker early with a status and its reason."""

    def __init__(self, status: str, why: str, **extra: Any) -> None:
        super().__init__(why)
        self.status, self.why, self.extra = status, why, extra


def _stage(name: str) -> None:
    print(STAGE + name, file=sys.stderr, flush=True)


def _ptgraph_frame(e: BaseException) -> str | None:
    """file:function:line of the innermost frame of ptgraph's own code in the error's traceback, named as in
    the repository (ptgraph/..., passes/..., trainers/...) wherever the packages were imported from."""
    import ptgraph
    import ptgraph.passes
    import ptgraph.trainers

    dirs = [(Path(m.__file__).resolve().parent, label) for m, label in
            ((ptgraph.passes, "passes"), (ptgraph.trainers, "trainers"), (ptgraph, "ptgraph"))]

    def own(filename: str) -> str | None:
        path = Path(filename).resolve()
        return next((f"{label}/{path.relative_to(d)}" for d, label in dirs if path.is_relative_to(d)), None)

    frames = [(own(f.filename), f) for f in traceback.extract_tb(e.__traceback__) if own(f.filename)]
    if not frames:
        return None
    name, f = frames[-1]
    return f"{name}:{f.name}:{f.lineno}"


def _wrong(stage: str, e: BaseException) -> Outcome:
    cause = e.__cause__ or e.__context__
    why = f"{stage}: {_one_line(e)}" + (f" (cause: {_one_line(cause)})" if cause is not None else "")
    return Outcome("WRONG", why, where=_ptgraph_frame(cause or e) or _ptgraph_frame(e))


def prepare(model_type: str, class_name: str, task: str, seed: int) -> tuple[Any, tuple, dict[str, Any]]:
    """The tiny model (random weights, train mode) that runs on its dummy input, the input, and what was made;
    raises Outcome (not built, too large)."""
    import torch
    import transformers

    _stage("config")
    cls = getattr(transformers, class_name)
    failures: list[str] = []
    try:
        configs = list(tiny_configs(cls.config_class, task == "sequence-classification"))
    except Exception as e:  # noqa: BLE001
        raise Outcome("not built", f"config: {_one_line(e)}" if not str(e).startswith("config:") else str(e)) from e
    for config, changes in configs:
        _stage("build")
        n = count_on_meta(cls, config)
        if n is not None and n > MAX_PARAMS:
            failures.append(f"too large: {n:,}")
            continue
        torch.manual_seed(seed)
        try:
            model = cls(config)
        except Exception as e:  # noqa: BLE001
            failures.append(f"build: {_one_line(e)}")
            continue
        n = sum(p.numel() for p in model.parameters())
        if n > MAX_PARAMS:
            failures.append(f"too large: {n:,}")
            continue
        _stage("forward")
        for desc, module, inputs in input_attempts(model, config, task, seed):
            why = _runs(module, inputs)
            if why is None:
                module.train()
                return module, inputs, {"params": n, "tiny": _describe(changes), "input": desc}
            failures.append(f"forward ({desc}): {why}")
    if failures and all(f.startswith("too large") for f in failures):
        raise Outcome("too large", f"{failures[0].split(': ')[1]} parameters after shrinking (limit {MAX_PARAMS:,})")
    raise Outcome("not built", next((f for f in failures if not f.startswith("too large")), "no config"),
                  attempts=failures)


def capture(model: Any, inputs: tuple) -> tuple[Any, float]:
    """ptgraph's capture and its seconds; raises Outcome: not capturable when torch.export alone refuses the
    model too (rerun without ptgraph, static shapes), else WRONG."""
    import torch

    from ptgraph import trace
    from ptgraph.errors import UserError

    _stage("trace")
    t0 = time.perf_counter()
    try:
        graph = trace(model, inputs)
    except UserError as e:
        if "cannot capture" not in str(e) and "neither torch.fx nor torch.export" not in str(e):
            raise _wrong("trace", e) from e
        try:
            with contextlib.redirect_stdout(sys.stderr):
                torch.export.export(model.train(), inputs, strict=False)
        except Exception as raw:  # noqa: BLE001 - torch's own refusal
            raise Outcome("not capturable", f"torch.export: {_one_line(raw)}") from raw
        raise _wrong("trace (torch.export alone captures it)", e) from e
    except Exception as e:  # noqa: BLE001 - anything else is ptgraph's
        raise _wrong("trace", e) from e
    return graph, time.perf_counter() - t0


def analyse(graph: Any) -> tuple[Any, dict[str, Any]]:
    """analyze_channels and the record's share, groups and frozen reasons; raises Outcome WRONG."""
    from ptgraph.passes.groups import analyze_channels

    _stage("analyze")
    t0 = time.perf_counter()
    try:
        analysis = analyze_channels(graph)
    except Exception as e:  # noqa: BLE001
        raise _wrong("analyze", e) from e
    groups = [{"size": g.size, "prunable": g.prunable, "exact": g.exact, "reason": g.reason}
              for g in analysis.groups]
    frozen: dict[str, int] = {}
    for g in groups:
        if not g["prunable"] and g["reason"] != "model output":
            frozen[g["reason"]] = frozen.get(g["reason"], 0) + g["size"]
    return analysis, {
        "analyze_s": time.perf_counter() - t0, "groups": len(groups),
        "prunable_groups": sum(g["prunable"] for g in groups),
        "exact_groups": sum(g["prunable"] and g["exact"] for g in groups),
        "channels": sum(g["size"] for g in groups),
        "channel_share": analysis.prunable_channel_fraction,
        "removable_share": analysis.removable_channel_fraction,
        "param_share": analysis.prunable_param_fraction(),
        "largest_frozen": _largest_frozen(groups),
        "frozen": dict(sorted(frozen.items(), key=lambda kv: -kv[1])[:3]),
    }


RANDOM_OPS = {"rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "bernoulli", "normal",
              "exponential", "uniform", "multinomial", "randperm"}


def random_ops(graph: Any) -> list[str]:
    """The random-number ops of the captured graph (dropout aside, which follows .eval()): train-mode code
    baked in by the capture (a stochastic depth), under which shrink vs mask compares two random draws and
    may pass by chance."""
    found = []
    for n in graph.module.graph.nodes:
        if n.op != "call_function":
            continue
        text = str(n.target)
        aten_op = text.startswith("aten.") and text.count(".") >= 2  # aten.rand.default
        name = text.split(".")[-2] if aten_op else getattr(n.target, "__name__", "")
        if name.rstrip("_") in RANDOM_OPS:
            found.append(name)
    return found


def _output_with_random(module: Any, inputs: tuple, value: float) -> Any:
    """The eval-mode output with every random-number op's result set to `value` (0 or nearly 1: the two
    extremes of a drop decision), so whether random numbers reach the output in eval is decided, not sampled."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ptgraph.passes.verify import flat_output

    class Fixed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            if name in RANDOM_OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
                out.fill_(value)
            return out

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), Fixed():
            return flat_output(module(*inputs))
    finally:
        module.train(was_training)


def random_in_eval(module: Any, inputs: tuple) -> bool:
    """True when random numbers reach `module`'s eval-mode output (a drop decision baked in by the capture)."""
    import torch

    try:
        low, high = _output_with_random(module, inputs, 0.0), _output_with_random(module, inputs, 1 - 1e-6)
    except Exception:  # noqa: BLE001 - a forward that cannot run this way is judged by verify alone
        return False
    return low.shape != high.shape or not torch.equal(low, high)


def check_deterministic(rec: dict[str, Any], ops: list[str], graph: Any, inputs: tuple, model_random: bool,
                        verify_failure: Outcome | None) -> None:
    """Raises Outcome WRONG when random numbers reach the captured graph's eval-mode output while the model's
    own eval output (`model_random`, judged before the shrink) is free of them, whatever verify said (it
    compares two random draws then)."""
    live = bool(ops) and not model_random and random_in_eval(graph.module, inputs)
    if not live:
        if verify_failure is not None:
            raise verify_failure
        return
    kinds = ", ".join(f"{ops.count(k)}x {k}" for k in sorted(set(ops)))
    note = f"random numbers reach the captured graph's eval output ({kinds}; train-mode code baked in)"
    if verify_failure is not None:
        raise Outcome("WRONG", f"{verify_failure.why}; {note}", **verify_failure.extra)
    raise Outcome("WRONG", f"{note}; verify passed, but compared two random draws (rel err {rec['rel_err']:.1e})")


def check_shrink(analysis: Any, inputs: tuple, ratio: float, seed: int) -> dict[str, Any]:
    """verify(): shrink a random `ratio` of every exact group against the mask; raises Outcome WRONG when the
    shrink fails or the shrunk model differs."""
    from ptgraph.passes.verify import exercise_zero_params, verify

    _stage("verify")
    exercise_zero_params(analysis.graph.module, seed)
    try:
        v = verify(analysis, inputs, ratio, seed).as_dict()
    except Exception as e:  # noqa: BLE001
        raise _wrong("shrink/verify", e) from e
    rec = {k: v[k] for k in ("rel_err", "max_abs_err", "params_before", "params_after", "params_predicted",
                             "groups_pruned", "shrink_seconds")}
    rec["verify_ok"] = bool(v["ok"])
    if not v["ok"]:
        parts = []
        if v["rel_err"] > REL_TOLERANCE or v["rel_err"] != v["rel_err"]:
            parts.append(f"rel err {v['rel_err']:.1e} > {REL_TOLERANCE:.0e}")
        if v["params_after"] != v["params_predicted"]:
            parts.append(f"params {v['params_after']:,} != predicted {v['params_predicted']:,}")
        raise Outcome("WRONG", "verify: " + ("; ".join(parts) or "output shape changed by the shrink"), **rec)
    return rec


def check_onnx(module: Any, inputs: tuple) -> dict[str, Any]:
    """ONNX export of the shrunk module, checked in onnxruntime (ptgraph.export); a failure is a note."""
    import tempfile

    from ptgraph.export import export

    _stage("onnx")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = export(module, inputs, f"{tmp}/model.onnx")
        return {"onnx_ok": bool(r.ok), "onnx_rel_err": r.rel_err, "onnx_exporter": r.exporter}
    except Exception as e:  # noqa: BLE001
        return {"onnx_ok": False, "onnx_rel_err": None, "onnx_error": _one_line(e)}


def worker(model_type: str, ratio: float = 0.3, seed: int = 0, onnx: bool = True,
           emit: Any = None) -> dict[str, Any]:
    """In this process: build, run, capture, analyse, verify and export one model type; the record.
    `emit(record)` is called with the record so far after verify (before the ONNX export, which may crash)."""
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    names = {t: (c, task) for t, c, task in hf_models()}
    if model_type not in names:
        return {"model": model_type, "status": "not built", "why": "not a model type of the three mappings"}
    class_name, task = names[model_type]
    rec: dict[str, Any] = {"model": model_type, "class": class_name, "task": task}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            model, inputs, made = prepare(model_type, class_name, task, seed)
            rec.update(made)
            graph, rec["trace_s"] = capture(model, inputs)
            rec["capture"] = graph.capture
            rec["leaves"] = sorted(graph.leaves)
            analysis, info = analyse(graph)
            rec.update(info)
            rec["random_ops"] = len(ops := random_ops(graph))
            model_random = bool(ops) and random_in_eval(model, inputs)
            try:
                rec.update(check_shrink(analysis, inputs, ratio, seed))
                failure = None
            except Outcome as o:
                if not o.why.startswith("verify:"):  # a crash in the shrink is WRONG as it is
                    raise
                failure = o
                rec.update(o.extra)
            check_deterministic(rec, ops, graph, inputs, model_random, failure)
            rec.update(status="verified", why="")
            if emit is not None:
                emit(rec)
            if onnx:
                rec.update(check_onnx(analysis.graph.module, inputs))
        except Outcome as o:
            rec.update(o.extra)
            rec.update(status=o.status, why=o.why)
    return rec


def _print_record(rec: dict[str, Any], final: bool = False) -> None:
    """The record as one stdout line the parent finds among whatever the model printed."""
    out = sys.__stdout__  # the worker sends the model's own prints to stderr; the record goes to the real stdout
    print(RECORD + json.dumps({**rec, "final": final}, default=str), file=out, flush=True)


# -- the sweep ---------------------------------------------------------------------------------
def _last_stage(stderr: str | bytes | None) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    stages = [ln[len(STAGE):].strip() for ln in text.splitlines() if ln.startswith(STAGE)]
    return stages[-1] if stages else "start"


def _error_line(stderr: str) -> str:
    """The last line of stderr that is not one of the worker's progress lines."""
    return last_line("\n".join(ln for ln in stderr.splitlines() if not ln.startswith(STAGE)))


def run_one(model_type: str, ratio: float, timeout: float, onnx: bool) -> dict[str, Any]:
    """One model type in a subprocess of this module, with a timeout; a crash or a timeout is classified by
    the stage the worker had reached (ptgraph's trace, analysis or shrink: WRONG)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, "--ratio", str(ratio)]
    cmd += [] if onnx else ["--no-onnx"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        stage = _last_stage(e.stderr)
        return {"model": model_type, "status": "timed out", "stage": stage,
                "why": f"timed out after {timeout:.0f} s in {stage}", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [ln[len(RECORD):] for ln in proc.stdout.splitlines() if ln.startswith(RECORD)]
    stage = _last_stage(proc.stderr)
    if lines:
        rec = json.loads(lines[-1])
        if not rec.pop("final", False):  # crashed after verify, in the ONNX export
            rec.update(onnx_ok=False, onnx_rel_err=None,
                       onnx_error=f"crashed (exit {proc.returncode}): {_error_line(proc.stderr)}"[:300])
    else:
        crash = f"crashed in {stage} (exit {proc.returncode}): {_error_line(proc.stderr) or 'no output'}"[:400]
        rec = {"model": model_type, "status": "WRONG" if stage in PTGRAPH_STAGES else "not built", "why": crash}
    rec.update(wall_s=wall, exit=proc.returncode)
    return rec


# -- the report --------------------------------------------------------------------------------
DIAGNOSIS_BEGIN = "<!-- diagnosis: written by hand after reading the WRONG results; tools/zoo_hf.py keeps it -->"
DIAGNOSIS_END = "<!-- end of diagnosis -->"


def _proc_loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def kept_diagnosis(doc: str) -> str:
    """The hand-written diagnosis section of an existing report (kept when the tables are rewritten)."""
    if DIAGNOSIS_BEGIN in doc and DIAGNOSIS_END in doc:
        return DIAGNOSIS_BEGIN + doc.split(DIAGNOSIS_BEGIN, 1)[1].split(DIAGNOSIS_END, 1)[0] + DIAGNOSIS_END + "\n"
    return f"{DIAGNOSIS_BEGIN}\n\n(no diagnosis written yet)\n\n{DIAGNOSIS_END}\n"


def _code(text: str) -> str:
    """Markdown inline code that may itself hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _rel(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _onnx_cell(r: dict[str, Any]) -> str:
    if "onnx_ok" not in r:
        return "-"
    if r.get("onnx_rel_err") is None:
        return "failed"
    return f"{'ok' if r['onnx_ok'] else '**FAIL**'} ({r['onnx_rel_err']:.1e})"


def _note(r: dict[str, Any]) -> str:
    """Why a model is not verified, or (verified) what holds its share down and an ONNX failure."""
    if r["status"] != "verified":
        where = f" [at {r['where']}]" if r.get("where") else ""
        return r.get("why", "") + where
    notes = []
    if r.get("onnx_error"):
        notes.append("ONNX: " + r["onnx_error"][:160])
    if r.get("largest_frozen"):
        notes.append(r["largest_frozen"])
    if r.get("leaves"):
        notes.append("leaves: " + ", ".join(r["leaves"]))
    return "; ".join(notes)


def _row(r: dict[str, Any]) -> str:
    status = "**WRONG**" if r["status"] == "WRONG" else r["status"]
    head = f"| {r['model']} | {r.get('class', '-')} | {r.get('task', '-')} | {cell(r.get('input', '-'))} | "
    if "groups" not in r:
        size = fmt_int(r.get("params"))
        return head + f"{r.get('capture', '-')} | {status} | - | - | - | {size} | - | - | {cell(_note(r))} |"
    params = f"{fmt_int(r.get('params_before', r.get('params')))} -> {fmt_int(r.get('params_after'))}"
    return head + (f"{r['capture']} | {status} | {r['groups']} ({r['prunable_groups']}) | "
                   f"{fmt_shares(r)} | "
                   f"{_rel(r.get('rel_err'))} | {params} | {_onnx_cell(r)} | {r['trace_s']:.1f} | {cell(_note(r))} |")


def frozen_kind(reason: str) -> str:
    """A frozen reason without its node names (`linear_9: ...`, `... in mul_20`, `('slice_1')`), to tally."""
    import re

    reason = re.sub(r" \('[^']*'\)$", "", reason.split(" ch frozen: ", 1)[-1])
    reason = re.sub(r"^[\w.]+: ", "", reason)
    reason = re.sub(r" in [\w.]+$", "", reason)
    return reason.replace("torch._ops.", "").replace(".default", "")


def frozen_tally(results: list[dict[str, Any]]) -> str:
    """What holds the share down: the kinds of the verified models' largest frozen reasons, most common first."""
    counts: dict[str, int] = {}
    for r in results:
        if r["status"] == "verified" and r.get("largest_frozen"):
            kind = frozen_kind(r["largest_frozen"])
            counts[kind] = counts.get(kind, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return "; ".join(f"{kind}: {n}" for kind, n in top) or "-"


def _median_line(analysed: list[dict[str, Any]], key: str, what: str) -> list[str]:
    """One summary line: the median of a share over the models that recorded it (none before issue 30)."""
    values = [r[key] for r in analysed if r.get(key) is not None]
    return [f"- {what}, median over {len(values)} models: **{fmt_pct(statistics.median(values))}**"] if values else []


def summary_lines(results: list[dict[str, Any]], not_reached: list[str]) -> list[str]:
    """Counts per class, the median prunable share, the worst verified error, ONNX and capture counts."""
    by = {s: [r for r in results if r["status"] == s] for s in STATUSES}
    verified = by["verified"]
    analysed = [r for r in results if "channel_share" in r]
    shares = [r["channel_share"] for r in analysed]
    worst = max((r["rel_err"] for r in verified if r.get("rel_err") is not None), default=None)
    worst_model = next((r["model"] for r in verified if r.get("rel_err") == worst), "-")
    captures = {c: sum(r.get("capture") == c for r in results) for c in ("fx", "export")}
    lines = [
        f"- model types: {len(results)} swept" + (f", {len(not_reached)} not reached" if not_reached else ""),
        "- " + "; ".join(f"{s}: **{len(by[s])}**" for s in STATUSES),
        f"- captured: {captures['export']} by torch.export, {captures['fx']} by torch.fx",
        f"- prunable share of channels (all groups' channels), median over the {len(analysed)} analysed models: "
        f"**{fmt_pct(statistics.median(shares)) if shares else '-'}** (verified only: "
        f"{fmt_pct(statistics.median([r['channel_share'] for r in verified])) if verified else '-'}; "
        f"range {fmt_pct(min(shares)) if shares else '-'} - {fmt_pct(max(shares)) if shares else '-'})",
        *_median_line(analysed, "removable_share", "prunable share of channels outside the model's outputs"),
        *_median_line(analysed, "param_share", "share of parameters in prunable groups"),
        f"- worst relative error among verified: **{_rel(worst)}** ({worst_model})",
        f"- shrunk models exported to ONNX and matching onnxruntime (1e-4): "
        f"**{sum(bool(r.get('onnx_ok')) for r in verified)} / {len(verified)}** verified",
    ]
    lines.append("- largest frozen reason of the verified models (what holds their share down), by kind: "
                 + frozen_tally(results))
    if not_reached:
        lines.append("- not reached (sweep stopped by --budget): " + ", ".join(not_reached))
    return lines


def wrong_lines(results: list[dict[str, Any]]) -> list[str]:
    """One entry per WRONG model: its type and class, the error or rel err, and where in ptgraph it raised."""
    wrong = [r for r in results if r["status"] == "WRONG"]
    if not wrong:
        return ["(none)"]
    return [f"- **{r['model']}** ({r.get('class', '?')}, {r.get('capture', 'capture -')}): {cell(r.get('why', ''))}"
            + (f" — raised at `{r['where']}`" if r.get("where") else "") for r in wrong]


def render(results: list[dict[str, Any]], runs: list[dict[str, Any]], mach: dict[str, str], ratio: float,
           timeout: float, not_reached: list[str], diagnosis: str) -> str:
    lines = [
        "# Hugging Face zoo: causal LM, image and sequence classification",
        "",
        "Generated by `tools/zoo_hf.py` (the diagnosis section is written by hand and kept). One model class per",
        "model type of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, then the types of",
        "`MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES` and `MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES` not",
        "already covered, built with random weights from the config class's defaults shrunk generically (no",
        "per-model configs, nothing downloaded): 2 layers, width 64, FFN 128, 4 heads (2 kv heads), vocabulary 256",
        "(special ids moved into it), 128 positions, images 64x64, per-stage width lists divided by a power of two",
        "(widest stage 64), stages at most 2 blocks, latent-attention sizes 16/32, the same in nested sub-configs.",
        "Where that config does not build or run: the vocabulary kept, then widths x4, then as many kv heads as",
        f"query heads where the defaults have as many. Over {MAX_PARAMS / 1e6:.0f}M parameters (on the meta device) is",
        "*too large*. Input: the model's `main_input_name`, random token ids (batch 2, length 16, no special",
        "ids; then ending in the eos id, then with an attention mask, whichever the forward first accepts) or one",
        "image of the config's size. Then `ptgraph.trace` (train mode), `analyze_channels`,",
        f"`verify(analysis, inputs, ratio={ratio})` (a random {ratio:.0%} of every exact group removed, shrunk vs",
        f"masked in eval mode, ok at relative error <= {REL_TOLERANCE:.0e} and the predicted parameter count) and",
        "`ptgraph.export.export` of the shrunk graph module, checked in onnxruntime.",
        "",
        "Classes: *verified*; **WRONG**: verify over tolerance, an error raised inside ptgraph's trace, analysis",
        "or shrink (a crash there is listed with its stage), or random numbers that reach the captured graph's",
        "eval output (every random op's result set to 0, then to 1 - 1e-6, changes it) where the model's own eval",
        "output stays the same: verify then compares two random draws; *not capturable*: torch.export",
        "itself refuses the model (ptgraph's capture failed and `torch.export.export(model, inputs, strict=False)`",
        "alone fails too; torch's reason); *not built*: the tiny config cannot be built or the model cannot run",
        "its own forward on the dummy input (eval and train mode); *too large*; *timed out*.",
        "",
        *(f"- command: {_code(r['command'])} ({r['models']} models), started {r['started']}, "
          f"{r['wall_s'] / 60:.1f} min; "
          f"`cat /proc/loadavg` at the start: `{r.get('proc_loadavg', r['load'])}`" for r in runs),
        f"- per-model timeout {timeout:.0f} s, one model at a time, each in its own process (OMP_NUM_THREADS=1)",
        f"- machine: {mach['cpu']}, {mach['cores']} cores; {mach['os']}; Python {mach['python']}",
        f"- torch {mach['torch']}, transformers {mach.get('transformers', '?')}, "
        f"onnxruntime {mach.get('onnxruntime', '?')}",
        "",
        "## Summary",
        "",
        *summary_lines(results, not_reached),
        "",
        "## WRONG results",
        "",
        *wrong_lines(results),
        "",
        diagnosis.rstrip("\n"),
        "",
        "## Every model",
        "",
        "Columns: *input*: what the forward ran on; *capture*: ptgraph's path; *groups (prunable)*; *channels*: share",
        "of all groups' channels that is prunable / the same without groups frozen only as the model's output /",
        "share of the parameters prunable groups could remove; *rel err*: shrunk vs masked; *params*: before -> after the",
        "random prune (for a model not analysed: its size); *ONNX*: onnxruntime vs PyTorch (rel err); *trace s*:",
        "capture seconds, cold, in the subprocess; *note*: the reason (not verified), or the largest frozen",
        "reason and an ONNX failure (verified).",
        "",
        "| model type | class | task | input | capture | status | groups (prunable) | channels | rel err | params "
        "| ONNX | trace s | note |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
        *(_row(r) for r in results),
    ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated model types (default: all, in mapping order)")
    p.add_argument("--out", default=str(ROOT / "docs" / "ZOO_HF.md"), help="markdown report (default: docs/ZOO_HF.md)")
    p.add_argument("--raw", default=None, help="also keep one JSON record per model in this jsonl file")
    p.add_argument("--reuse", action="store_true", help="with --raw: keep its records and run only the types it "
                   "lacks, or those --models names")
    p.add_argument("--timeout", type=float, default=300, help="seconds per model (default: 300)")
    p.add_argument("--ratio", type=float, default=0.3, help="share of channels verify drops (default: 0.3)")
    p.add_argument("--budget", type=float, default=None, help="minutes after which no new model is started; the "
                   "rest is listed as not reached (resume with --raw --reuse)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--note", default=None, help="kept with this sweep's record and shown in its command in the "
                   "report (say which code it ran)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        rec = worker(args.worker, args.ratio, 0, not args.no_onnx, emit=_print_record)
        _print_record(rec, final=True)
        return 0

    everything = [t for t, _, _ in hf_models()]
    chosen = chosen_models(args.models, everything, everything, "model types of the three mappings")
    if chosen is None:
        return 2
    raw = Path(args.raw) if args.raw else None
    if raw is not None:
        raw.parent.mkdir(parents=True, exist_ok=True)
    results, runs, _, todo = records(args, chosen, everything)
    mach = _machine()
    run = new_sweep(argv, todo, mach, runs)
    run["command"] = run["command"].replace("tools/zoo.py", "tools/zoo_hf.py", 1)
    run["proc_loadavg"] = _proc_loadavg()
    if args.note:
        run["note"] = args.note
    t0 = time.perf_counter()
    deadline = t0 + args.budget * 60 if args.budget else None

    def one(name: str) -> dict[str, Any]:
        if deadline is not None and time.perf_counter() > deadline:
            return {"model": name, "status": NOT_REACHED}
        return run_one(name, args.ratio, args.timeout, not args.no_onnx)

    def save() -> None:
        if raw is not None:
            write_raw(raw, _reached(results), runs, None)

    sweep(todo, one, 1, results, run, t0, save)
    results = _reached(results)
    pool = everything if raw is not None and args.reuse else chosen
    shown = [results[m] for m in pool if m in results]
    not_reached = [m for m in pool if m not in results]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    diagnosis = kept_diagnosis(out.read_text() if out.exists() else "")
    out.write_text(render(shown, runs, mach, args.ratio, args.timeout, not_reached, diagnosis))
    wrong = sum(r["status"] == "WRONG" for r in shown)
    print(f"{sum(r['status'] == 'verified' for r in shown)}/{len(shown)} verified, {wrong} WRONG, "
          f"{len(not_reached)} not reached; wrote {out}", file=sys.stderr)
    return 0 if wrong == 0 else 1


def _reached(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records of models that ran (not those skipped by --budget)."""
    return {m: r for m, r in results.items() if r["status"] != NOT_REACHED}


def _machine() -> dict[str, str]:
    """zoo.py's machine description, with the transformers and onnxruntime versions."""
    import transformers

    mach = machine()
    mach["transformers"] = transformers.__version__
    try:
        import onnxruntime

        mach["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        mach["onnxruntime"] = "not installed"
    return mach


if __name__ == "__main__":
    sys.exit(main())
