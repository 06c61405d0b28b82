"""Torch-Pruning (DepGraph) against ptgraph: speed on six models, correctness over the torchvision zoo.

Torch-Pruning is an optional dev dependency (`pip install -e '.[bench]'`); the package never imports it.

Timing (one process, interleaved rounds after a warm-up, fresh deep copies, copying not timed):
Torch-Pruning's `DependencyGraph().build_dependency` alone, and its usual high-level path
`BasePruner(model, x, MagnitudeImportance(p=2), pruning_ratio, ignored_layers=[classifier]) + step()`,
against ptgraph's trace + analyze_channels, and trace + analysis + random plan + shrink.

Sweep (every torchvision classification model, each tool on each model in its own subprocess with a
timeout): prune ~`--ratio` of the channels, then check on fresh random batches (the same for both tools)
  forward   eval mode, batch 2: every output has the dense model's shape and is finite
  backward  train mode, batch 2: loss.backward() runs, the loss and every gradient are finite
  ONNX      ptgraph.export.export: TorchScript exporter (dynamo=False), opset 17, onnx.checker,
            onnxruntime matches PyTorch to 1e-4 relative on the same batch
and record the share of conv output channels and of parameters actually removed.

Torch-Pruning is run the way its own torchvision benchmark (benchmarks/prunability) runs it: model in
eval mode, every Linear/Conv with num_classes outputs and every attention out_proj ignored, ViTs with
round_to=num_heads and `model.hidden_dim` reset after the step. ptgraph is run as tools/zoo.py runs it:
traced in train mode, a random plan over every exact group, shrink; the pruned model is `graph.module`.

    python tools/bench_vs_torch_pruning.py --part timing --runs 5
    python tools/bench_vs_torch_pruning.py --part sweep --raw runs/vs_tp.jsonl            # every model
    python tools/bench_vs_torch_pruning.py --part sweep --raw runs/vs_tp.jsonl --reuse    # only what it lacks
    python tools/bench_vs_torch_pruning.py --part sweep --raw runs/vs_tp.jsonl --reuse --models googlenet
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.export import export
from ptgraph.graph import trace
from ptgraph.passes import analyze_channels, keep_every_tensor, random_plan, shrink
from ptgraph.specs import build_model, default_input_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402  (tools/zoo.py: model list, machine line, small helpers)

ROOT = zoo.ROOT
TOOLS = ("ptgraph", "torch_pruning")
TIMING_MODELS = ("resnet50", "densenet121", "efficientnet_b0", "vit_b_16", "convnext_tiny", "regnet_y_400mf")
NUM_CLASSES = 1000


def _first(e: BaseException) -> str:
    """The exception's first line, and where it was raised (the innermost frame)."""
    text = str(e).strip()
    line = text.splitlines()[0][:160] if text else ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" [{'/'.join(Path(tb.tb_frame.f_code.co_filename).parts[-2:])}:{tb.tb_lineno}]" if tb else ""
    return f"{type(e).__name__}: {line}{where}"


def _tensors(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _counts(module: Any) -> tuple[int, int]:
    """(parameters, conv output channels) of a module."""
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed]
    return sum(p.numel() for p in module.parameters()), sum(int(m.weight.shape[0]) for m in convs)


# -- the two tools ----------------------------------------------------------------------------
def tp_ignored(model: Any) -> list:
    """The layers Torch-Pruning's own torchvision benchmark ignores: the classifier(s) and attention out_proj."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            out.append(m)
        elif isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES:
            out.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == NUM_CLASSES:
            out.append(m)  # squeezenet's classifier is a conv
    return out


def tp_prune(model: Any, x: Any, ratio: float) -> tuple[Any, dict[str, float]]:
    """Torch-Pruning's high-level path, in place; returns the model and (init, step) seconds."""
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    vit = isinstance(model, VisionTransformer)
    t0 = time.perf_counter()
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=tp_ignored(model),
                                  round_to=model.encoder.layers[0].num_heads if vit else None)
    t1 = time.perf_counter()
    pruner.step()
    if vit:  # torchvision's ViT reshapes with its stored hidden_dim (as Torch-Pruning's benchmark does)
        model.hidden_dim = model.conv_proj.out_channels
    t2 = time.perf_counter()
    return model, {"init": t1 - t0, "step": t2 - t1}


def pt_trace_analyze(model: Any, x: Any, capture: str = "auto") -> Any:
    return analyze_channels(trace(model, (x,), capture=capture))


def pt_shrink(analysis: Any, ratio: float, seed: int) -> Any:
    shrink(analysis, keep_every_tensor(analysis, random_plan(analysis.groups, ratio, seed=seed)))
    return analysis.graph.module


# -- timing -----------------------------------------------------------------------------------
def timing(models: list[str], runs: int, ratio: float, capture: str = "auto") -> dict[str, Any]:
    """Warm-up round, then `runs` rounds; in each round every model, the three jobs in rotating order."""
    templates, rows = {}, {m: [] for m in models}
    for name in models:
        spec = f"torchvision:{name}"
        templates[name] = (build_model(spec), torch.randn(default_input_shape(spec)))

    def job(kind: str, name: str, seed: int) -> dict[str, float]:
        template, x = templates[name]
        model = copy.deepcopy(template)
        if kind == "pt":
            model.train()
            t0 = time.perf_counter()
            analysis = pt_trace_analyze(model, x, capture)
            t1 = time.perf_counter()
            pt_shrink(analysis, ratio, seed)
            t2 = time.perf_counter()
            return {"pt_trace_analyze": t1 - t0, "pt_total": t2 - t0}
        model.eval()
        t0 = time.perf_counter()
        if kind == "forward":  # what Torch-Pruning's build runs: one forward with autograd on
            model(x)
            return {"forward": time.perf_counter() - t0}
        if kind == "tp_build":
            import torch_pruning as tp

            tp.DependencyGraph().build_dependency(model, example_inputs=x)
            return {"tp_build": time.perf_counter() - t0}
        _, parts = tp_prune(model, x, ratio)
        return {"tp_total": time.perf_counter() - t0, "tp_init": parts["init"], "tp_step": parts["step"]}

    kinds = ["tp_build", "tp_prune", "pt", "forward"]
    for r in range(runs + 1):
        for name in models:
            row: dict[str, float] = {}
            for k in kinds[r % 4:] + kinds[:r % 4]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.update(job(k, name, r))
            if r > 0:
                row["load"] = os.getloadavg()[0]  # 1-minute load average when the model's round ended
                rows[name].append(row)
        print(f"  timing round {r}/{runs} done{' (warm-up)' if r == 0 else ''}", file=sys.stderr, flush=True)
    out = {}
    for name, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        med["ratio_build"] = statistics.median(x["tp_build"] / x["pt_trace_analyze"] for x in rs)
        med["ratio_total"] = statistics.median(x["tp_total"] / x["pt_total"] for x in rs)
        out[name] = {"median": med, "runs": rs}
    return out


def print_timing(res: dict[str, Any], runs: int) -> None:
    print(f"\nseconds, {runs} interleaved rounds after a warm-up; median (and best) of the rounds; ratio = "
          "Torch-Pruning / ptgraph, median of the per-round ratios (and ratio of the bests); dense forward: one eval "
          "forward of the example input with autograd on, which Torch-Pruning's build runs\n")
    print("| model | dense forward | TP build_dependency | ptgraph trace + analysis | ratio | TP pruner init + step "
          "| ptgraph trace + analysis + plan + shrink | ratio | load average |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in res.items():
        m = r["median"]
        b = {k: min(x[k] for x in r["runs"]) for k in r["runs"][0]}
        print(f"| {name} | {m['forward']:.3f} ({b['forward']:.3f}) | {m['tp_build']:.3f} ({b['tp_build']:.3f}) | {m['pt_trace_analyze']:.3f} "
              f"({b['pt_trace_analyze']:.3f}) | {m['ratio_build']:.1f}x ({b['tp_build'] / b['pt_trace_analyze']:.1f}x) | "
              f"{m['tp_total']:.3f} ({b['tp_total']:.3f}) | {m['pt_total']:.3f} ({b['pt_total']:.3f}) | "
              f"{m['ratio_total']:.1f}x ({b['tp_total'] / b['pt_total']:.1f}x) | {_loads(r['runs'])} |")
    print("\nmedian split of Torch-Pruning's pruner: " + "; ".join(
        f"{n} init {r['median']['tp_init']:.3f} + step {r['median']['tp_step']:.3f}" for n, r in res.items()))


def _loads(runs: list[dict[str, float]]) -> str:
    """The 1-minute load average over the model's rounds: median (min-max)."""
    loads = [x["load"] for x in runs if "load" in x]
    return f"{statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f})" if loads else "?"


# -- sweep: one tool on one model (worker) ----------------------------------------------------
def _loss(outs: list) -> Any:
    """Cross-entropy on every (batch, classes) output (aux heads included), mean square on anything else."""
    total = torch.zeros(())
    for o in outs:
        o = o.float()
        if o.dim() == 2 and o.shape[1] == NUM_CLASSES:
            total = total + F.cross_entropy(o, torch.arange(o.shape[0]) % NUM_CLASSES)
        else:
            total = total + o.square().mean()
    return total


def sweep_one(tool: str, name: str, ratio: float, seed: int) -> dict[str, Any]:
    spec = f"torchvision:{name}"
    torch.manual_seed(seed)
    model = build_model(spec)
    shape = default_input_shape(spec)
    x = torch.randn(shape)
    xb = torch.randn(2, *shape[1:])
    rec: dict[str, Any] = {}
    rec["params_before"], rec["conv_before"] = _counts(model)
    t0 = time.perf_counter()
    try:
        if tool == "ptgraph":
            model.train()
            analysis = pt_trace_analyze(model, x)
            target = analysis.graph.module  # what ptgraph prunes and hands back
        else:
            model.eval()
            target = model
        target.eval()
        with torch.no_grad():
            ref = [tuple(o.shape) for o in _tensors(target(xb))]
        t0 = time.perf_counter()
        if tool == "ptgraph":
            pruned = pt_shrink(analysis, ratio, seed)
        else:
            pruned, _ = tp_prune(model, x, ratio)
    except Exception as e:  # noqa: BLE001
        rec.update(prune_error=_first(e), forward_ok=False, backward_ok=False, onnx_ok=False)
        return rec
    rec["prune_s"] = time.perf_counter() - t0
    rec["params_after"], rec["conv_after"] = _counts(pruned)
    rec["conv_removed"] = 1 - rec["conv_after"] / rec["conv_before"] if rec["conv_before"] else 0.0
    rec["params_removed"] = 1 - rec["params_after"] / rec["params_before"]

    torch.manual_seed(seed + 1)
    batch = torch.randn(2, *shape[1:])
    try:  # forward
        pruned.eval()
        with torch.no_grad():
            outs = _tensors(pruned(batch))
        got = [tuple(o.shape) for o in outs]
        if got != ref:
            raise ValueError(f"output shapes {got} != dense {ref}")
        if not all(torch.isfinite(o).all() for o in outs):
            raise ValueError("non-finite output")
        rec["forward_ok"] = True
    except Exception as e:  # noqa: BLE001
        rec.update(forward_ok=False, forward_error=_first(e))
    try:  # backward
        pruned.train()
        for p in pruned.parameters():
            p.grad = None
        loss = _loss(_tensors(pruned(batch)))
        loss.backward()
        grads = [p.grad for p in pruned.parameters() if p.grad is not None]
        if not torch.isfinite(loss) or not grads or not all(torch.isfinite(g).all() for g in grads):
            raise ValueError("non-finite loss or gradient, or no gradient")
        rec["backward_ok"] = True
    except Exception as e:  # noqa: BLE001
        rec.update(backward_ok=False, backward_error=_first(e))
    try:  # ONNX
        for p in pruned.parameters():
            p.grad = None
        with tempfile.TemporaryDirectory(prefix="vs_tp_") as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export(pruned, (batch,), os.path.join(d, "m.onnx"))
        rec["onnx_rel_err"] = res.rel_err
        rec["onnx_ok"] = bool(res.ok)
        if not res.ok:
            rec["onnx_error"] = f"onnxruntime differs from PyTorch (rel err {res.rel_err:.1e})"
    except Exception as e:  # noqa: BLE001
        rec.update(onnx_ok=False, onnx_error=_first(e))
    return rec


def run_worker(tool: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--models", name,
           "--ratio", str(args.ratio), "--seed", str(args.seed), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"prune_error": f"timed out after {args.timeout:.0f} s", "forward_ok": False, "backward_ok": False,
                "onnx_ok": False, "wall_s": time.perf_counter() - start}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        rec = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        why = zoo._last_line(proc.stderr) or (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                                              else f"exit code {proc.returncode}")
        rec = {"prune_error": f"worker died: {why}"[:200], "forward_ok": False, "backward_ok": False, "onnx_ok": False}
    rec["wall_s"] = time.perf_counter() - start
    return rec


# -- sweep report -----------------------------------------------------------------------------
def _ok(r: dict[str, Any]) -> bool:
    return bool(r.get("forward_ok") and r.get("backward_ok") and r.get("onnx_ok"))


def _why(r: dict[str, Any]) -> str:
    if "prune_error" in r:
        return "prune: " + r["prune_error"]
    return "; ".join(f"{k}: {r[k + '_error']}" for k in ("forward", "backward", "onnx") if k + "_error" in r)


def summarize(results: list[dict[str, Any]]) -> None:
    n = len(results)
    print(f"\n{n} torchvision classification models\n")
    print("| tool | pruned without error | forward shape | backward | ONNX + onnxruntime match | all three "
          "| conv channels removed (median) | params removed (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tool in TOOLS:
        rs = [r[tool] for r in results]
        conv = [x["conv_removed"] for x in rs if "conv_removed" in x and x["conv_before"]]
        par = [x["params_removed"] for x in rs if "params_removed" in x]
        nothing = sum(1 for x in rs if "prune_error" not in x and x.get("params_after") == x["params_before"])
        print(f"| {tool} | {sum('prune_error' not in x for x in rs)} / {n} | {sum(bool(x.get('forward_ok')) for x in rs)} / {n} "
              f"| {sum(bool(x.get('backward_ok')) for x in rs)} / {n} | {sum(bool(x.get('onnx_ok')) for x in rs)} / {n} "
              f"| **{sum(_ok(x) for x in rs)} / {n}** | {zoo._pct(statistics.median(conv)) if conv else '-'} "
              f"| {zoo._pct(statistics.median(par)) if par else '-'} |" + (f" ({nothing} pruned nothing)" if nothing else ""))
    print("\nmodels where a tool fails a check:\n")
    for r in sorted(results, key=lambda r: r["model"]):
        for tool in TOOLS:
            if not _ok(r[tool]):
                print(f"- {r['model']}, {tool}: {_why(r[tool])}")
    print("\nper model: conv channels removed / params removed (ptgraph | torch_pruning)\n")
    for r in sorted(results, key=lambda r: r["model"]):
        cells = [f"{zoo._pct(r[t].get('conv_removed'))} / {zoo._pct(r[t].get('params_removed'))} "
                 f"{'ok' if _ok(r[t]) else 'FAIL'}" for t in TOOLS]
        print(f"  {r['model']:24s} {cells[0]:26s} | {cells[1]}")


# -- raw records: a header line {"_runs": [...]} then one line per model ----------------------
def load_raw(path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    out, runs = {}, []
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line) if line.strip() else {}
        if "_runs" in rec:
            runs = rec["_runs"]
        elif rec:
            out[rec["model"]] = rec
    return out, runs


def write_raw(path: Path, results: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"_runs": runs}) + "\n" + "".join(json.dumps(r) + "\n" for r in results.values()))
    tmp.replace(path)


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("timing", "sweep", "both"), default="both")
    p.add_argument("--models", default=None, help="comma-separated subset (default: timing: "
                   f"{','.join(TIMING_MODELS)}; sweep: every classification model)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds after the warm-up (default: 5)")
    p.add_argument("--ratio", type=float, default=0.3, help="share of channels to prune (default: 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; more than the free cores make "
                   "every op wait for the busiest one: beside two 1-thread jobs on 2 cores, a 2-thread regnet_y_400mf "
                   "forward took 2.7 s instead of 0.05 s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model and tool (default: 600)")
    p.add_argument("--raw", default=str(ROOT / "runs" / "vs_torch_pruning.jsonl"), help="sweep records (jsonl)")
    p.add_argument("--reuse", action="store_true", help="keep the records in --raw and run only the models it "
                   "lacks, or those --models names")
    p.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="timing: ptgraph's capture path (default: auto, as ptgraph.trace; auto takes torch.export for "
                   "nn.MultiheadAttention models such as vit_b_16)")
    p.add_argument("--timing-out", default=None, help="also write the timing results (JSON) here")
    p.add_argument("--tools", default=",".join(TOOLS), help="with --reuse: rerun only these tools, keep the "
                   "other's record (default: both)")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if importlib.util.find_spec("torch_pruning") is None:
        print("error: torch-pruning is not installed; pip install -e '.[bench]' (torch-pruning==1.6.1)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.worker:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(sweep_one(args.worker, chosen[0], args.ratio, args.seed)))
        return 0

    mach = zoo.machine()
    tp_version = importlib.metadata.version("torch-pruning")
    command = "python tools/bench_vs_torch_pruning.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"{command.strip()}\n{zoo._now()}; {mach['cpu']}, {mach['cores']} cores, {args.threads} torch threads; "
          f"Python {mach['python']}, torch {mach['torch']}, torchvision {mach['torchvision']}, torch-pruning "
          f"{tp_version}; load average {mach['load']}", flush=True)
    if args.part in ("timing", "both"):
        models = chosen if chosen and args.part == "timing" else list(TIMING_MODELS)
        res = timing(models, args.runs, args.ratio, args.capture)
        print_timing(res, args.runs)
        if args.timing_out:
            Path(args.timing_out).write_text(json.dumps({"command": command, "date": zoo._now(), "machine": mach,
                                                         "torch_pruning": tp_version, "models": res}, indent=1))
    if args.part in ("sweep", "both"):
        everything = zoo.torchvision_models()
        unknown = [m for m in chosen or [] if m not in everything]
        if unknown:
            print(f"error: not torchvision classification models: {', '.join(unknown)}", file=sys.stderr)
            return 2
        raw = Path(args.raw)
        raw.parent.mkdir(parents=True, exist_ok=True)
        results, runs = load_raw(raw) if args.reuse else ({}, [])
        todo = chosen or [m for m in everything if m not in results]
        run = {"command": command.strip(), "models": len(todo), "started": zoo._now(), "wall_s": 0.0,
               "load": mach["load"], "torch_pruning": tp_version, "torch": mach["torch"]}
        runs.append(run)
        t0 = time.perf_counter()
        for name in todo:
            rec: dict[str, Any] = {"model": name, "cnn": zoo.is_cnn(name), **results.get(name, {})}
            for tool in TOOLS:
                if tool in args.tools.split(",") or tool not in rec:
                    rec[tool] = run_worker(tool, name, args)
            results[name] = rec
            run["wall_s"] = time.perf_counter() - t0
            write_raw(raw, results, runs)
            print(f"[{run['wall_s']:6.0f} s] {name}: " + "; ".join(
                f"{t} {'ok' if _ok(rec[t]) else 'FAIL ' + _why(rec[t])[:120]} "
                f"(conv -{zoo._pct(rec[t].get('conv_removed'))})" for t in TOOLS), file=sys.stderr, flush=True)
        summarize([results[m] for m in everything if m in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
