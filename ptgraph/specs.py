"""Model specs: one string names a model everywhere (CLI, checkpoints, tools).

    torchvision:NAME[?key=value&...]   any name of torchvision.models.list_models()
    ptgraph:NAME[?num_classes=10]      CIFAR models: the paper's resnet20/32/56/110, resnet50; mobilenet_v2
    ptgraph:gpt[?vocab_size=256&...]   a tiny GPT for token data (ptgraph/lm_models.py)
    timm:NAME[?key=value&...]          when timm is installed
    some.module:callable[?key=value]   the user's own code (callable returns an nn.Module)
    run:RUN_DIR                        a prune-train run's final architecture, freshly initialised

Values are Python literals (numbers, True/False, tuples); anything else stays a string.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from torch import nn

from ptgraph.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "torchvision", "ptgraph", "timm", or a module path
    name: str
    kwargs: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.source}:{self.name}" + (f"?{query}" if query else "")


def _literal(value: str) -> object:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_spec(spec: str) -> ModelSpec:
    head, _, query = spec.partition("?")
    source, sep, name = head.rpartition(":")
    if not sep or not source or not name:
        raise UserError(f"model spec '{spec}' is not SOURCE:NAME; use torchvision:resnet50, timm:NAME or my.module:make_model")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise UserError(f"model spec '{spec}' has a malformed ?key=value list; write e.g. torchvision:resnet18?num_classes=10") from None
    return ModelSpec(source, name, tuple((k, _literal(v)) for k, v in pairs))


def build_model(spec: str | ModelSpec) -> nn.Module:
    """Build the model a spec names, with random weights."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    kwargs = dict(s.kwargs)
    if s.source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if s.name not in names:
            close = [n for n in names if n.startswith(s.name[:4])][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"torchvision has no model '{s.name}'{hint}; see torchvision.models.list_models()")
        kwargs = _no_backbone_weights(torchvision.models.get_model_builder(s.name), kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _call(lambda: torchvision.models.get_model(s.name, weights=None, **kwargs), s)
    if s.source == "ptgraph":
        from ptgraph.cifar_models import MODELS as CIFAR_MODELS
        from ptgraph.lm_models import MODELS as LM_MODELS

        models = {**CIFAR_MODELS, **LM_MODELS}
        if s.name not in models:
            raise UserError(f"ptgraph has no built-in model '{s.name}'; choose one of {', '.join(models)}")
        return _call(lambda: models[s.name](**kwargs), s)
    if s.source == "run":
        from ptgraph.trainers.checkpoint import final_architecture

        return final_architecture(_run_payload(s))
    if s.source == "timm":
        try:
            import timm
        except ImportError:
            raise UserError(f"'{s}' needs timm, which is not installed; run pip install timm") from None
        if s.name not in timm.list_models():
            raise UserError(f"timm has no model '{s.name}'; see timm.list_models()")
        return _call(lambda: timm.create_model(s.name, pretrained=False, **kwargs), s)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so `my_models:net` finds ./my_models.py
    try:
        module = importlib.import_module(s.source)
    except ImportError as e:
        raise UserError(f"cannot import module '{s.source}' ({e}); check the spelling and that it is on PYTHONPATH") from None
    factory = getattr(module, s.name, None)
    if not callable(factory):
        raise UserError(f"module '{s.source}' has no callable '{s.name}'; name a function or class that returns an nn.Module")
    model = _call(lambda: factory(**kwargs), s)
    if not isinstance(model, nn.Module):
        raise UserError(f"'{s}' returned {type(model).__name__}, not an nn.Module; name a callable that builds the model")
    return model


def _run_payload(spec: ModelSpec) -> dict:
    """What a `run:RUN_DIR` spec needs of the run's checkpoint (spec, plans, input shape and dtype), read once per
    checkpoint file: building, the default input shape and dtype each ask, and the weights are not kept."""
    if spec.kwargs:
        raise UserError(f"'{spec}' takes no ?key=value list: the run's checkpoint fixes the model; write run:RUN_DIR")
    path = Path(spec.name)
    path = path / "checkpoint.pt" if path.is_dir() else path
    return _architecture_of(str(path.resolve()), path.stat().st_mtime_ns if path.exists() else None)


@functools.lru_cache(maxsize=4)
def _architecture_of(path: str, stamp: int | None) -> dict:
    from ptgraph.trainers.checkpoint import load

    payload = load(Path(path))  # its checks: one sentence for a missing, truncated or foreign file
    return {k: payload[k] for k in ("spec", "plans", "input_shape", "input_dtype") if k in payload}


def _no_backbone_weights(builder: Callable[..., nn.Module], kwargs: dict[str, object]) -> dict[str, object]:
    """kwargs with weights_backbone=None where the builder takes it and the user left it out: its default
    (segmentation, detection) downloads ImageNet weights, and a spec promises random weights, offline."""
    if "weights_backbone" in kwargs or "weights_backbone" not in inspect.signature(builder).parameters:
        return kwargs
    return {**kwargs, "weights_backbone": None}


def _call(make, spec: ModelSpec) -> nn.Module:
    try:
        return make()
    except TypeError as e:
        raise UserError(f"cannot build '{spec}' with those arguments ({e}); check the ?key=value list") from None


def default_input_dtype(spec: str | ModelSpec) -> str:
    """'long' (token ids) for the built-in language model, else 'float': what `--input-dtype` means when not given."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.source == "run":
        return _run_payload(s).get("input_dtype", "float")
    return "long" if (s.source, s.name) == ("ptgraph", "gpt") else "float"


VIDEO_CLIP = (16, 112, 112)  # frames, height, width: the Kinetics clip of torchvision's R(2+1)D family


def default_input_shape(spec: str | ModelSpec, model: nn.Module | None = None) -> tuple[int, ...]:
    """The input a model of this spec expects by default (batch of 1): an image, a video clip when the
    model's first convolution is 3-D (so it reads (C, T, H, W)), or a block of tokens for ptgraph:gpt."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.source == "run":
        return (1, *_run_payload(s)["input_shape"][1:])
    size = dict(s.kwargs).get("image_size")
    if isinstance(size, int):
        return (1, 3, size, size)
    if s.source == "torchvision" and s.name == "inception_v3":
        return (1, 3, 299, 299)
    if s.source == "ptgraph" and s.name == "gpt":
        block = dict(s.kwargs).get("block_size", 64)
        return (1, block if isinstance(block, int) and block > 0 else 64)
    if s.source == "ptgraph":
        return (1, 3, 32, 32)
    stem = first_conv(model) if model is not None else None
    if isinstance(stem, nn.Conv3d):
        return (1, stem.in_channels, *VIDEO_CLIP)
    return (1, 3, 224, 224)


def first_conv(model: nn.Module) -> nn.modules.conv._ConvNd | None:
    """The model's first convolution in registration order (its stem, in every library model seen), or None."""
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
