"""The `ptgraph` command line. Errors a user can cause print one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch

from ptgraph.cli_args import build_parser
from ptgraph.errors import RankFailure, UserError


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape '{text}' is not a list of integers; write it like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input-shape '{text}' needs positive sizes; write it like 1,3,224,224")
    return shape


def load_and_trace(args: argparse.Namespace) -> tuple[Any, Any, tuple, dict[str, float]]:
    """Build the model a spec names, trace it in training mode and analyse its channels."""
    from ptgraph.graph import trace
    from ptgraph.passes import analyze_channels
    from ptgraph.inputs import check_input_count, make_inputs, token_vocab
    from ptgraph.specs import build_model, default_input_dtype, default_input_shape

    if getattr(args, "meta", False):
        with torch.device("meta"):  # shapes without values: nothing of the weights is allocated
            model = build_model(args.model)
    else:
        model = build_model(args.model)
    model.train(args.mode == "train")
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else [default_input_shape(args.model, model)]
    check_input_count(model, len(shapes))
    args.input_dtype = args.input_dtype or default_input_dtype(args.model)
    torch.manual_seed(args.seed)
    inputs = tuple(x for shape in shapes for x in make_inputs(model, shape, args.input_dtype))
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = trace(model, inputs, leaf_modules=args.leaf, ignore=args.ignore)
        except UserError as e:  # floats fed to an embedding: name the flag, not the shape
            if args.input_dtype == "float" and token_vocab(model) is not None and "indices" in str(e):
                raise UserError(f"{type(model).__name__} reads token ids with an nn.Embedding, not floats; pass "
                                f"--input-dtype long (with --input-shape BATCH,LENGTH)") from None
            raise
    for w in caught:
        if str(w.message).startswith("ptgraph:"):
            print(f"warning: {str(w.message)[len('ptgraph: '):]}", file=sys.stderr)
    t1 = time.perf_counter()
    analysis = analyze_channels(graph)
    t2 = time.perf_counter()
    return model, analysis, inputs, {"trace": t1 - t0, "analyze": t2 - t1}


def summary(analysis: Any, seconds: dict[str, float]) -> dict[str, Any]:
    from ptgraph.cost import forward_flops
    from ptgraph.passes import count_params

    gm = analysis.graph.module
    return {
        "groups": [
            {"id": g.id, "size": g.size, "members": len(g.members),
             "examples": sorted({m.name.rsplit(".", 1)[0] for m in g.members})[:3],
             "prunable": g.prunable, "exact": g.exact, "reason": g.reason}
            for g in analysis.groups
        ],
        "params": count_params(gm),
        "prunable_params": analysis.prunable_params(),
        "prunable_channel_fraction": analysis.prunable_channel_fraction,
        "removable_channel_fraction": analysis.removable_channel_fraction,
        "prunable_param_fraction": analysis.prunable_param_fraction(),
        "conv_prunable_fraction": analysis.conv_prunable_fraction(),
        "capture": analysis.graph.capture,
        "capture_choice": analysis.graph.choice,
        "flops": forward_flops(gm),
        "leaves": analysis.graph.leaves,
        "original_module_runs_pruned": analysis.original_module_runs_pruned,
        "seconds": seconds,
    }


def shape_plan_summary(analysis: Any, share: float, round_to: int) -> dict[str, Any]:
    """The uniform plan of shapes to `share` of the FLOPs (no weights needed): its FLOPs, parameters, widths."""
    from ptgraph.passes import count_params, predict_params
    from ptgraph.trainers.planning import shape_plan

    if not 0 < share <= 1:
        raise UserError(f"--target-flops {share:g} is not a share of the dense FLOPs; give a number in (0, 1], e.g. 0.5")
    start = time.perf_counter()
    plan, flops = shape_plan(analysis, share, max(1, round_to))
    seconds = time.perf_counter() - start
    sizes = {g.id: g.size for g in analysis.groups}
    return {"target_flops": share, "flops": flops, "params": predict_params(analysis, plan),
            "params_before": count_params(analysis.graph.module), "seconds": seconds,
            "widths": {gid: [sizes[gid], len(keep)] for gid, keep in sorted(plan.keep.items())}}


def _print_report(info: dict[str, Any], model: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"channel groups of {model}")
    for col in ("id", "size", "members", "example members", "status", "exact"):
        table.add_column(col)
    for g in info["groups"]:
        status = "prunable" if g["prunable"] else f"frozen: {g['reason']}"
        exact = "yes" if g["exact"] else ("no: " + (g["reason"] or "") if g["prunable"] else "-")
        table.add_row(str(g["id"]), str(g["size"]), str(g["members"]), ", ".join(g["examples"]), status, exact)
    console.print(table)
    n_prunable = sum(g["prunable"] for g in info["groups"])
    console.print(
        f"{len(info['groups'])} groups, {n_prunable} prunable; parameters {info['params']:,} "
        f"({info['prunable_params']:,} prunable, {info['prunable_param_fraction']:.1%}); prunable channels "
        f"{info['removable_channel_fraction']:.1%} without the model's outputs ({info['prunable_channel_fraction']:.1%} "
        f"of all; conv channels {info['conv_prunable_fraction']:.1%}); {info['flops'] / 1e9:.3f} GFLOPs/sample; "
        f"trace {info['seconds']['trace']:.3f} s, analysis {info['seconds']['analyze']:.3f} s"
    )
    if info.get("capture_choice"):
        console.print(f"capture: {info['capture_choice']}")
    if "plan" in info:
        p = info["plan"]
        widths = ", ".join(f"g{g}: {a}->{b}" for g, (a, b) in list(p["widths"].items())[:8])
        more = f" (+{len(p['widths']) - 8} more)" if len(p["widths"]) > 8 else ""
        console.print(f"plan to {p['target_flops']:g} of the FLOPs (uniform, each group's first channels: shapes "
                      f"only, training ranks channels by their norms): {p['flops'] / 1e9:.3f} GFLOPs/sample "
                      f"({p['flops'] / max(info['flops'], 1):.1%}); parameters {p['params_before']:,} -> "
                      f"{p['params']:,}; {widths}{more}; planned in {p['seconds']:.2f} s")
    if not info["original_module_runs_pruned"]:
        console.print("note: a shrink rewrites graph constants (reshape sizes, split sections); "
                      "run and export the traced graph module, not the original object")
    if "onnx" in info and "error" in info["onnx"]:
        console.print(f"onnx [red]FAILED[/red]: {info['onnx']['error']}")
    elif "onnx" in info:
        o = info["onnx"]
        console.print(f"onnx {'[green]OK[/green]' if o['ok'] else '[red]MISMATCH[/red]'}: {o['exporter']} exporter, "
                      f"opset {o['opset']}, relative error {o['rel_err']:.2e}, {o['file_bytes'] / 1e6:.2f} MB")
    if "verify" in info:
        v = info["verify"]
        verdict = "[green]OK[/green]" if v["ok"] else "[red]MISMATCH[/red]"
        console.print(
            f"verify {verdict}: {v['groups_pruned']} groups pruned; max abs error {v['max_abs_err']:.2e}, "
            f"relative error {v['rel_err']:.2e}; parameters {v['params_before']:,} -> {v['params_after']:,} "
            f"(predicted {v['params_predicted']:,}); GFLOPs {v['flops_before'] / 1e9:.3f} -> "
            f"{v['flops_after'] / 1e9:.3f}; shrink {v['shrink_seconds']:.3f} s"
        )


def cmd_analyze(args: argparse.Namespace) -> int:
    from ptgraph.passes.verify import exercise_zero_params, verify

    if args.meta and (args.verify or args.onnx):
        raise UserError("--verify and --onnx run the model, and --meta builds it without weights; leave out --meta to "
                        "verify (or --verify to plan the shapes of a model too large for this machine)")
    _, analysis, inputs, seconds = load_and_trace(args)
    info = summary(analysis, seconds)
    if args.target_flops is not None:
        info["plan"] = shape_plan_summary(analysis, args.target_flops, args.round_to)
    if args.draw:  # before --verify, which shrinks the model
        from ptgraph.draw import draw

        info["drawing"] = str(draw(analysis, args.draw))
    ok = True
    if args.verify:
        exercise_zero_params(analysis.graph.module, args.seed)
        result = verify(analysis, inputs, args.ratio, args.seed)
        info["verify"] = result.as_dict()
        ok = result.ok
        if args.onnx:
            import tempfile

            from ptgraph.export import export

            try:
                with tempfile.TemporaryDirectory() as tmp:
                    onnx_result = export(analysis.graph.module, inputs, f"{tmp}/model.onnx")
                info["onnx"] = {k: v for k, v in onnx_result.as_dict().items() if k != "path"}
            except UserError as e:  # keep the verify figures; say why the export failed
                info["onnx"] = {"ok": False, "error": str(e), "rel_err": None}
            ok = ok and info["onnx"]["ok"]
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        _print_report(info, args.model)
        if args.draw:
            print(f"drawing: {info['drawing']}")
    return 0 if ok else 1


def _print_export(r: Any) -> None:
    verdict = "OK" if r.ok else "MISMATCH"
    print(f"exported {r.path} ({r.exporter} exporter, opset {r.opset}, {r.file_bytes / 1e6:.2f} MB, "
          f"{r.params:,} parameters); onnxruntime {verdict}: max abs error {r.max_abs_err:.2e}, "
          f"relative error {r.rel_err:.2e}")


def cmd_export(args: argparse.Namespace) -> int:
    from ptgraph.cost import forward_flops
    from ptgraph.export import export

    if bool(args.source) == bool(args.model):
        raise UserError("export needs either a RUN_DIR/checkpoint or --model SPEC (not both)")
    from ptgraph.inputs import make_inputs

    if args.source:
        from ptgraph.trainers.checkpoint import load, rebuild

        payload = load(args.source)
        model, shape = rebuild(payload)
        shapes, dtype = [(1, *shape[1:])], args.input_dtype or payload.get("input_dtype", "float")
    else:
        args.mode = "eval"
        _, analysis, inputs, _ = load_and_trace(args)
        model, shapes, dtype = analysis.graph.module, [tuple(x.shape) for x in inputs], args.input_dtype
    if args.input_shape:
        shapes = [parse_shape(s) for s in args.input_shape]
    torch.manual_seed(args.seed)
    inputs = tuple(x for shape in shapes for x in make_inputs(model, shape, dtype))
    result = export(model, inputs, args.out, args.opset, args.dynamic_batch)
    info = {**result.as_dict(), "flops": forward_flops(model)}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_export(result)
        print(f"{info['flops'] / 1e9:.3f} GFLOPs per sample")
    return 0 if result.ok else 1


def cmd_prune_train(args: argparse.Namespace) -> int:
    from ptgraph.trainers.config import TrainConfig
    from ptgraph.trainers.loop import train

    if not args.model and not args.resume:
        raise UserError("prune-train needs --model SPEC (or --resume RUN_DIR)")
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    cfg = TrainConfig(**{**fields, "model": args.model or ""})
    cfg.check()
    if cfg.fsdp and (args.nproc_per_node or int(os.environ.get("WORLD_SIZE", "1"))) < 2:
        raise UserError("--fsdp shards the model across processes; run it with 2 or more, under torchrun or with "
                        "--nproc-per-node N")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError("--nproc-per-node must be 1 or more")
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:  # the launcher; under torchrun: a rank
        from pathlib import Path

        from ptgraph.trainers.distributed import launch
        from ptgraph.trainers.report import default_run_dir

        argv = list(args.argv)
        if args.resume:
            run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        else:  # named here, so that every rank and the failure message agree on it
            run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.model)
            argv += [] if args.run_dir else ["--run-dir", str(run_dir)]
        return launch(args.nproc_per_node, argv, run_dir)
    train(cfg, resume_dir=args.resume)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser({"analyze": cmd_analyze, "export": cmd_export, "prune-train": cmd_prune_train}).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the --nproc-per-node launcher passes them on
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # a peer died or stalled; under the launcher, the launcher says which
        if args.debug:
            raise
        if not os.environ.get("PTGRAPH_LAUNCHED"):
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
