"""ONNX export of a (pruned) model, checked with onnx.checker and against onnxruntime.

The TorchScript-based exporter (`dynamo=False`) needs nothing beyond torch and exports fx
graph modules as they run, with the rewritten channel constants; it exists across the whole
supported torch range. Where a torch has dropped it, the dynamo exporter is used (it needs
onnxscript).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ptgraph.aux_outputs import without_aux_heads
from ptgraph.errors import UserError
from ptgraph.inputs import like
from ptgraph.onnx_functional import functional_slice_writes

TOLERANCE = 1e-4  # relative, float32
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    path: str
    opset: int
    exporter: str
    ok: bool
    max_abs_err: float
    rel_err: float
    file_bytes: int
    params: int
    op_counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flat(out: Any) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat(o)]
    return []


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _PositionalOnly(nn.Module):
    """`model` with a forward of its positional inputs only. The TorchScript exporter appends the defaults of a
    forward's other parameters as traced inputs (timm's ViT: `attn_mask=None, is_causal=False`, placeholders of
    the traced graph), and a bool traced as a tensor breaks the call. The submodules, parameters and buffers are
    the model's own, not a child's, so the ONNX initializers keep the model's names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not registered: no "model." prefix on the names
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.training = model.training  # the exporter restores this mode afterwards, on the shared submodules

    def forward(self, *inputs: Any) -> Any:
        return self._model(*inputs)


def _export(model: nn.Module, inputs: tuple, path: str, opset: int, dynamic_batch: bool) -> str:
    model = _PositionalOnly(model)
    names = [f"input{i}" for i in range(len(inputs))]
    with torch.no_grad():
        n_out = len(_flat(model(*inputs)))
    # explicit output names: the TorchScript exporter otherwise reads them off `model.graph`, which
    # on an fx GraphModule is the fx graph
    outputs = [f"output{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in names + outputs} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs, path, input_names=names, output_names=outputs, opset_version=opset,
                              dynamic_axes=axes, dynamo=False)
            return "torchscript"
        except TypeError as e:  # a torch without the dynamo switch or without the TorchScript exporter
            if "dynamo" not in str(e):
                raise  # the model's own error, not the exporter's signature
            torch.onnx.export(model, inputs, path, input_names=names, opset_version=opset, dynamo=True,
                              dynamic_shapes=[{0: torch.export.Dim("batch")}] * len(inputs) if dynamic_batch else None)
            return "dynamo"


def _run_onnxruntime(path: str, inputs: tuple, opset: int) -> list[np.ndarray]:
    """The exported file's outputs in onnxruntime; a file onnxruntime cannot load or run (an exporter's graph
    that is valid ONNX but wrong for these shapes, as torch emits for torchvision's MViT) is one clear error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors come back as the exception below, not as log lines
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime cannot run the model exported at opset {opset} ({first[:300]}); try another "
                        f"--opset, or --ignore the module that holds this op") from None


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = False, check_batch: int | None = None) -> ExportResult:
    """Export `model` as it runs in eval mode (auxiliary heads dropped) to ONNX, check it, run the same random batch through onnxruntime and
    PyTorch, and return the figures. With `dynamic_batch`, the check uses a batch of `check_batch` (default 3)."""
    import onnx

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = without_aux_heads(model)
    path = str(path)
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: folder {parent} does not exist or is not writable; pass another --out")
    was_training = model.training
    model.eval()
    try:
        try:
            written = functional_slice_writes(model) if isinstance(model, fx.GraphModule) else model
            with _quiet_stdout():  # the exporter prints its IR to the C-level stdout on failure
                exporter = _export(written, inputs, path, opset, dynamic_batch)
        except Exception as e:  # noqa: BLE001 - name the failing op and the opset
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"the ONNX exporter failed at opset {opset} ({first}); try another --opset, or --ignore "
                            f"the module that holds this op") from None
        onnx.checker.check_model(path)  # by path: models over 2 GB keep their weights in external data
        proto = onnx.load(path, load_external_data=False)
        batch = (check_batch or 3) if dynamic_batch else None
        check_inputs = tuple(like(model, x, batch) for x in inputs)  # token ids stay ids of the model's vocabulary
        with torch.no_grad():
            want = _flat(model(*check_inputs))
        got = _run_onnxruntime(path, check_inputs, opset)
    finally:
        model.train(was_training)
    max_abs, num, den = 0.0, 0.0, 0.0
    shapes_ok = len(got) == len(want) and all(g.shape == w.shape for g, w in zip(got, want))
    if shapes_ok:
        for g, w in zip(got, want):
            d = np.abs(g.astype(np.float64) - w.astype(np.float64))
            max_abs = max(max_abs, float(d.max()) if d.size else 0.0)
            num += float((d ** 2).sum())
            den += float((w.astype(np.float64) ** 2).sum())
    rel = math.sqrt(num / den) if den > 0 else max_abs
    ops = Counter(n.op_type for n in proto.graph.node)
    return ExportResult(path, opset, exporter, shapes_ok and rel <= TOLERANCE, max_abs, rel, os.path.getsize(path),
                        sum(p.numel() for p in model.parameters()), dict(sorted(ops.items())))


def initializer_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights (initializers) stored in an ONNX file."""
    import onnx

    return {t.name: tuple(t.dims) for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def conv_weight_shapes(path: str | os.PathLike) -> list[tuple[int, ...]]:
    """The weight shape of every Conv and Gemm node, in graph order (for checking pruned shapes)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits]

