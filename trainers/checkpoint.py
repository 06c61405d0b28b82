"""Checkpoints: the model spec plus every applied plan rebuilds the architecture; state rides along.

Writes are atomic (a temporary file, fsync, then os.replace), so a run killed during a save
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptgraph.errors import UserError
from ptgraph.specs import parse_spec
from ptgraph.trainers.config import TrainConfig

FORMAT = "ptgraph-prunetrain"
VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path} ({e.strerror}); choose a writable --run-dir with free space") from None


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint file, or the checkpoint.pt of a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; pass a run directory of ptgraph prune-train or its checkpoint.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file at all
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); it is truncated or not a ptgraph "
                        f"checkpoint, restore it or start a new run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a ptgraph prune-train checkpoint; pass the run directory it wrote")
    if payload.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {payload.get('version')}, this ptgraph reads {VERSION}; "
                        f"use the ptgraph release that wrote it")
    return payload


def resumed_config(cfg: TrainConfig, payload: dict[str, Any], resume_dir: str) -> TrainConfig:
    """The saved run's config; only where and how it runs (device, workers, logging, timeout) come from `cfg`."""
    saved = TrainConfig(**payload["config"])
    if cfg.model and parse_spec(cfg.model).name != parse_spec(saved.model).name:
        raise UserError(f"the checkpoint in {resume_dir} is of {saved.model}, not {cfg.model}; "
                        f"resume without --model or pass the matching run directory")
    return dataclasses.replace(saved, device=cfg.device, workers=cfg.workers, data_on_device=cfg.data_on_device,
                               tensorboard=cfg.tensorboard, dist_timeout=cfg.dist_timeout,
                               run_dir=str(Path(resume_dir) if Path(resume_dir).is_dir() else Path(resume_dir).parent))


def rebuild(payload: dict[str, Any]) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The pruned model a checkpoint describes: spec -> trace -> replay every plan -> weights.

    Returns the traced graph module (in eval mode) and the input shape it was traced with.
    """
    torch.manual_seed(0)
    module = _replayed(payload)
    try:
        module.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not fit the rebuilt model ({str(e).splitlines()[0]}); it was "
                        f"written by another ptgraph version") from None
    return module.eval(), tuple(payload["input_shape"])


def final_architecture(payload: dict[str, Any]) -> torch.nn.Module:
    """The final architecture of a run, freshly initialised (the model spec `run:RUN_DIR`): what retraining the
    widths PruneTrain found from scratch starts from.

    The run's model is built from its spec with the caller's random state, traced, and shrunk by the run's plans,
    which slices that fresh draw; then the weights whose initial scale follows the layer's width are drawn again
    at the final widths: convolutions Kaiming-normal over their fan-out (the initialisation of torchvision's and
    ptgraph's CNNs, and the one docs/BENCHMARKS.md measured), biases zero, norms reset. Other layers keep the
    constructor's draw, sliced. Returned in train mode.
    """
    module = _replayed(payload)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.reset_parameters()
    return module.train()


def _replayed(payload: dict[str, Any]) -> torch.nn.Module:
    """The run's spec built with the current random state, traced in train mode, every plan applied. The graph
    module keeps the built model's plain settings (numbers, strings, flags such as a GPT's block_size, which
    the token data reads) that tracing does not carry over; a width among them is the dense model's."""
    from ptgraph.graph import trace
    from ptgraph.inputs import make_inputs
    from ptgraph.passes import PrunePlan, analyze_channels, shrink
    from ptgraph.specs import build_model

    model = build_model(payload["spec"]).train()
    example = make_inputs(model, tuple(payload["input_shape"]), payload.get("input_dtype", "float"))  # ids for an LM
    analysis = analyze_channels(graph := trace(model, example))
    for plan in payload["plans"]:
        shrink(analysis, PrunePlan.from_json(plan))
    for key, value in vars(model).items():
        if not key.startswith("_") and isinstance(value, (bool, int, float, str)) and not hasattr(graph.module, key):
            setattr(graph.module, key, value)
    return graph.module


# -- FSDP2: the model and the optimizer state through torch.distributed.checkpoint, each rank writing its shards --
def save_sharded(run_dir: Path, tag: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Every rank writes its shards of the model and the optimizer state into RUN_DIR/checkpoint-TAG.dcp (a
    collective); returns the directory's name, which the checkpoint.pt written after it records, so a run killed
    between the two resumes from the previous pair."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    name = f"checkpoint-{tag}.dcp"
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(Path(run_dir) / name))
    return name


def load_sharded(run_dir: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The shards `save_sharded` wrote, into a model sharded alike (the same plans, the same number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    path = Path(run_dir) / name
    if not path.is_dir():
        raise UserError(f"the sharded checkpoint {path} is missing; resume needs the run directory the FSDP run wrote")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def drop_older_sharded(run_dir: Path, keep: str) -> None:
    """Remove the sharded checkpoints older than `keep` (rank 0, after checkpoint.pt names `keep`)."""
    import shutil

    for old in Path(run_dir).glob("checkpoint-*.dcp"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
