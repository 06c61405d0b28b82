"""The second capture path: torch.export (non-strict), for models symbolic tracing cannot see.

torch.export runs the model on fake tensors, so Python control flow over shapes and
configuration (Hugging Face models, loops over heads, `if x.shape[1] != ...`) is resolved at
capture time. What comes back is an fx graph of ATen ops over the model's own parameters:
get_attr nodes under their original names, holding the very same tensor objects, so shrinking
them shows in the user's model and in any optimizer built on it.

Four things are adjusted so that the graph can be trained and evaluated like a symbolic trace:
- mode: export bakes train/eval into the ops (dropout's `train`, batch norm's `training`, the
  attention dropout probability, stochastic depth's random mask); those read the graph module's `training` instead,
  so `.train()` / `.eval()` behave as on the original model (the model is exported in train mode);
- device: constants created on the export device (`arange(..., device=cpu)`) follow the
  parameters' device, so the graph module moves with `.to(...)`;
- guards and metadata asserts (input shapes, dtype/device of intermediates) are dropped: every op
  checks its shapes anyway, and the asserts would fail after `.to(cuda)` or under autocast;
- sizes: the batch and sequence axes of the inputs are exported as dynamic where the model allows
  it, so a view's batch or sequence size is read at run time rather than baked in.
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ptgraph.passes.flow import set_arg

aten = torch.ops.aten

# in-place variants too: `nn.Dropout(p, inplace=True)` (HF MobileNet's classifier) exports as dropout_
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default, aten.dropout_.default, aten.feature_dropout_.default,
             aten.alpha_dropout_.default, aten.feature_alpha_dropout_.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default, aten._assert_async.msg}


def _dynamic_shapes(example_inputs: tuple) -> tuple:
    """Token ids: every axis (batch, sequence) may vary. Float inputs: the batch, and the sequence of a
    (batch, sequence, features) input; image sizes stay fixed (dynamic spatial sizes make export slow)."""
    auto = torch.export.Dim.AUTO

    def axes(x: torch.Tensor) -> dict[int, Any]:
        varying = range(x.dim()) if not x.is_floating_point() else range(min(x.dim(), 2 if x.dim() == 3 else 1))
        return {d: auto for d in varying}

    return tuple(axes(x) if isinstance(x, torch.Tensor) else None for x in example_inputs)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export logs guards and fallbacks and prints the graph it failed on; a failed attempt is
    ptgraph's to report (one line), so its logs, warnings and prints are held back."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def export_module(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Capture `model` with torch.export; returns a plain GraphModule (mode-following, device-free)
    that shares the model's parameters and buffers. Raises what torch.export raises."""
    was_training = model.training
    model.train()
    try:
        with _quiet_export():
            try:
                ep = torch.export.export(model, example_inputs, dynamic_shapes=_dynamic_shapes(example_inputs),
                                         strict=False)
            except Exception:  # noqa: BLE001 - some models refuse dynamic sizes: capture them static
                ep = torch.export.export(model, example_inputs, strict=False)
    finally:
        model.train(was_training)
    exported = ep.module()
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten.lift_fresh_copy.default:
            node.target = aten.clone.default  # the same copy of a constant (`torch.tensor(...)`), which ONNX can export
    _follow_mode(graph)
    _follow_device(graph, _device_of(model))
    gm = fx.GraphModule(exported, graph, class_name=type(model).__name__)
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(was_training)
    return gm


def _device_of(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _after_inputs(graph: fx.Graph) -> fx.Node:
    """The first node after the placeholders and get_attrs, where new read-only nodes can go."""
    return next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))


def _follow_mode(graph: fx.Graph) -> None:
    """Literal train flags become reads of the graph module's `training`."""
    training: fx.Node | None = None

    def flag() -> fx.Node:
        nonlocal training
        if training is None:
            with graph.inserting_before(_after_inputs(graph)), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `training` is a plain attribute of every module, not a tensor
                training = graph.get_attr("training")
        return training

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS and _arg(node, 2, "train") is True:
            set_arg(node, 2, "train", flag())
        elif node.target is aten.batch_norm.default and _arg(node, 5, "training") is True \
                and isinstance(_arg(node, 3, "running_mean"), fx.Node):
            set_arg(node, 5, "training", flag())
        elif node.target is aten.add_.Tensor and _is_batch_counter(node.args[0]) and node.args[1] == 1:
            node.update_arg(1, flag())  # num_batches_tracked counts training steps only
        elif (keep := _bernoulli_keep(node)) is not None:
            _keep_in_eval(graph, node, keep, flag())
        elif node.target is aten.scaled_dot_product_attention.default:
            p = _arg(node, 4, "dropout_p", 0.0)
            if isinstance(p, float) and p > 0:
                with graph.inserting_before(node):
                    set_arg(node, 4, "dropout_p", graph.call_function(operator.mul, (flag(), p)))


_BERNOULLI = {aten.bernoulli.p, aten.bernoulli_.float}


def _bernoulli_keep(node: fx.Node) -> float | None:
    """The keep probability of a per-sample Bernoulli mask, as stochastic depth draws it (HF's and timm's
    drop_path: `floor(keep + rand(shape))`, `new_empty(shape).bernoulli_(keep)`); None for other nodes."""
    if node.target in _BERNOULLI:
        p = _arg(node, 1, "p", 0.5)  # bernoulli_'s default
        return p if isinstance(p, float) and 0 < p < 1 else None
    if node.target not in (aten.floor.default, aten.floor_.default) or not isinstance(node.args[0], fx.Node):
        return None
    add = node.args[0]
    if add.target is not aten.add.Tensor or len(add.args) != 2:
        return None
    rand, keep = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
    is_rand = isinstance(rand, fx.Node) and rand.target in (aten.rand.default, aten.rand_like.default)
    return keep if is_rand and isinstance(keep, float) and 0 < keep < 1 else None


def _keep_in_eval(graph: fx.Graph, mask: fx.Node, keep: float, training: fx.Node) -> None:
    """A drop-path mask `m` becomes `keep + (m - keep) * training`: the same draw in training, the constant
    `keep` in eval, which the code's own `x / keep * m` (or `m / keep`) turns into the identity, as
    `if not self.training: return x` does."""
    with graph.inserting_after(mask):
        centred = graph.call_function(aten.sub.Tensor, (mask, keep))
    with graph.inserting_after(centred):
        on = graph.call_function(operator.mul, (training, 1.0))  # a Python float: ONNX has no Tensor * bool
    with graph.inserting_after(on):
        gated = graph.call_function(aten.mul.Tensor, (centred, on))
    with graph.inserting_after(gated):
        out = graph.call_function(aten.add.Tensor, (gated, keep))
    mask.replace_all_uses_with(out, delete_user_cb=lambda user: user is not centred)


def _is_batch_counter(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr" and str(value.target).endswith("num_batches_tracked")


def _follow_device(graph: fx.Graph, device: torch.device | None) -> None:
    """`device=` constants equal to the parameters' device read it from a parameter instead."""
    if device is None:
        return
    anchor = next((n for n in graph.nodes if n.op == "get_attr"), None)
    if anchor is None:
        return
    read: fx.Node | None = None
    for node in list(graph.nodes):
        value = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(value, torch.device) and value == device:
            if read is None:
                with graph.inserting_before(_after_inputs(graph)):
                    read = graph.call_function(getattr, (anchor, "device"))
            node.update_kwarg("device", read)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)
