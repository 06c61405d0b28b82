"""Model-zoo sweep: analyse and verify every torchvision classification model, write docs/ZOO.md.

Each model runs in its own subprocess (memory, isolation, a per-model timeout) as

    python -m ptgraph analyze --model torchvision:NAME --verify --ratio 0.3 --json

which traces the model in train mode, analyses its channels, prunes a random 30% of every
exact group and checks shrink against mask on a random input (1x3x224x224; inception_v3
299x299). A refusal (exit code 2) or an internal error is recorded with its one-line message.
A second subprocess times trace, analysis and shrink of a few reference models.

    python tools/zoo.py                                 # every model, writes docs/ZOO.md
    python tools/zoo.py --models resnet18,googlenet --out /tmp/zoo.md
    python tools/zoo.py --raw /tmp/zoo.jsonl --reuse    # run only what the jsonl lacks

`--timm` sweeps timm instead (tools/zoo_timm.py): one model per architecture family (the timm module a model is
registered in, `timm.list_modules()`), the smallest by parameter count (counted on the meta
device, cached in --sizes), plus the module's smallest real model where the smallest is one of
timm's `test_*` configurations. Each is built from its config (pretrained=False, nothing is
downloaded) and run in its own subprocess at a small input: 128x128 where the model runs on it
(a fixed-size model is rebuilt with img_size=128 when its constructor takes one), else its
default size. The table replaces the timm section of docs/ZOO.md and leaves the rest.

    python tools/zoo.py --timm --raw runs/zoo_timm.jsonl    # every family, writes the timm section
    python tools/zoo.py --timm --models ghostnet_050,levit_128s --out /tmp/zoo.md

`--tasks` sweeps torchvision's other model zoos (tools/zoo_tasks.py): segmentation, video, optical flow and
detection, each through the CLI at a small input of its task, and writes their section of docs/ZOO.md.

    python tools/zoo.py --tasks --jobs 1 --raw runs/zoo_tasks.jsonl
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")  # reported apart from the CNNs (the 90% conv target)
TIMING_MODELS = ("resnet50", "densenet121", "vit_b_16")
CONV_TARGET = 0.9
REL_TOLERANCE = 1e-4


def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def is_cnn(name: str) -> bool:
    return not name.startswith(TRANSFORMER_PREFIXES)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _largest_frozen(groups: list[dict[str, Any]]) -> str | None:
    """The reason of the largest frozen group that is not the model's output (what holds the share down)."""
    frozen = [g for g in groups if not g["prunable"] and g["reason"] != "model output"]
    if not frozen:
        return None
    by_reason: dict[str, int] = {}
    for g in frozen:
        by_reason[g["reason"]] = by_reason.get(g["reason"], 0) + g["size"]
    reason, size = max(by_reason.items(), key=lambda kv: kv[1])
    return f"{size} ch frozen: {reason}"


def run_model(name: str, ratio: float, timeout: float, threads: int | None, family: str | None = None,
              onnx: bool = True, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the CLI (timm: this tool's worker) on one model in a subprocess and condense its JSON;
    `extra`: more CLI arguments for a torchvision model (--input-shape)."""
    if family is None:
        cmd = [sys.executable, "-m", "ptgraph", "analyze", "--model", f"torchvision:{name}", "--verify",
               *(["--onnx"] if onnx else []), "--ratio", str(ratio), "--json", *extra]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--timm-worker", name, "--ratio", str(ratio)]
        cmd += [] if onnx else ["--no-onnx"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rec: dict[str, Any] = {"model": name, "cnn": is_cnn(name)}
    if family is not None:
        rec["family"] = family
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", why=f"timed out after {timeout:.0f} s", wall_s=time.perf_counter() - start)
        return rec
    rec["wall_s"] = time.perf_counter() - start
    rec["exit"] = proc.returncode
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        line = last_line(proc.stderr) or f"exit code {proc.returncode}, no output"
        rec.update(status="refused" if proc.returncode == 2 else "error", why=line)
        return rec
    if "refused" in info:
        rec.update(status="refused", why=info["refused"])
        return rec
    if family is not None:
        rec.update(cnn=not info["attention"] and info["convs"] >= 4, graph_cnn=not info["attention"] and info["convs"] >= 4,
                   input=info["input"],
                   built_with=info["built_with"])
    groups = info["groups"]
    v = info.get("verify", {})
    rec.update(
        groups=len(groups),
        prunable_groups=sum(g["prunable"] for g in groups),
        exact_groups=sum(g["prunable"] and g["exact"] for g in groups),
        channel_share=info["prunable_channel_fraction"],
        removable_share=info.get("removable_channel_fraction"),
        param_share=info.get("prunable_param_fraction"),
        capture=info.get("capture"),
        capture_choice=info.get("capture_choice") or None,
        conv_share=info["conv_prunable_fraction"],
        params_before=v.get("params_before", info["params"]),
        params_after=v.get("params_after"),
        params_predicted=v.get("params_predicted"),
        rel_err=v.get("rel_err"),
        max_abs_err=v.get("max_abs_err"),
        verify_ok=bool(v.get("ok")),
        onnx_ok=bool(info.get("onnx", {}).get("ok")),
        onnx_rel_err=info.get("onnx", {}).get("rel_err"),
        groups_pruned=v.get("groups_pruned"),
        trace_s=info["seconds"]["trace"],
        analyze_s=info["seconds"]["analyze"],
        shrink_s=v.get("shrink_seconds"),
        leaves=info.get("leaves") or {},
        largest_frozen=_largest_frozen(groups),
    )
    if not rec["verify_ok"]:
        rec["status"] = "mismatch"
        parts = []
        if rec["rel_err"] is not None and rec["rel_err"] > REL_TOLERANCE:
            parts.append(f"rel err {rec['rel_err']:.1e} > {REL_TOLERANCE:.0e}")
        if rec["params_after"] != rec["params_predicted"]:
            parts.append(f"params {rec['params_after']} != predicted {rec['params_predicted']}")
        rec["why"] = "verify failed: " + ("; ".join(parts) or last_line(proc.stderr) or "output shape changed")
    else:
        rec["status"] = "ok"
        notes = []
        if not rec["onnx_ok"]:
            notes.append(f"ONNX: onnxruntime differs (rel err {rec['onnx_rel_err']:.1e})" if rec["onnx_rel_err"]
                         is not None else "ONNX: " + info.get("onnx", {}).get("error", "export failed")[:170])
        if rec["leaves"]:
            notes.append("leaves: " + ", ".join(sorted(rec["leaves"])))
        if rec["cnn"] and rec["conv_share"] <= CONV_TARGET and rec["largest_frozen"]:
            notes.append(rec["largest_frozen"])
        elif family is not None and rec["largest_frozen"]:
            notes.append(rec["largest_frozen"])
        if family is not None:
            inexact = [g for g in groups if g["prunable"] and not g["exact"]]
            if inexact:
                by_reason: dict[str, int] = {}
                for g in inexact:
                    key = g["reason"].split(" (")[0]
                    by_reason[key] = by_reason.get(key, 0) + g["size"]
                reason, size = max(by_reason.items(), key=lambda kv: kv[1])
                notes.append(f"{len(inexact)} prunable groups inexact, not verified (largest: {size} ch, {reason})")
        rec["why"] = "; ".join(notes)
    return rec


# -- timing -----------------------------------------------------------------------------------
def timing_worker(models: list[str], runs: int, ratio: float) -> dict[str, Any]:
    """In this process: one warm-up, then `runs` timed rounds of trace, analysis and shrink per model."""
    import warnings

    import torch

    from ptgraph.graph import trace
    from ptgraph.passes import analyze_channels, keep_every_tensor, random_plan, shrink
    from ptgraph.specs import build_model, default_input_shape

    out: dict[str, Any] = {}
    for name in models:
        spec = f"torchvision:{name}"
        rows = []
        for i in range(runs + 1):
            model = build_model(spec)
            model.train()
            x = torch.randn(default_input_shape(spec))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                graph = trace(model, (x,))
                t1 = time.perf_counter()
                analysis = analyze_channels(graph)
                t2 = time.perf_counter()
                plan = keep_every_tensor(analysis, random_plan(analysis.groups, ratio, seed=i))
                shrink(analysis, plan)
                t3 = time.perf_counter()
            if i > 0:  # run 0 is the warm-up
                rows.append({"trace": t1 - t0, "analyze": t2 - t1, "shrink": t3 - t2, "total": t3 - t0})
        out[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        out[name]["runs"] = rows
    return out


def run_timing(models: list[str], runs: int, ratio: float, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--timing-worker", "--models", ",".join(models),
           "--timing-runs", str(runs), "--ratio", str(ratio)]
    load, date = _load(), _now()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    try:
        return {"models": json.loads(proc.stdout), "load": load, "date": date}
    except json.JSONDecodeError:
        return {"error": last_line(proc.stderr) or f"exit code {proc.returncode}"}


def chosen_models(models: str | None, known: "Iterable[str]", default: list[str], what: str) -> list[str] | None:
    """The --models list (`default` when not given); None, after one error line, when it names a model not in `known`."""
    known = set(known)
    chosen = [m.strip() for m in models.split(",") if m.strip()] if models else default
    unknown = [m for m in chosen if m not in known]
    if unknown:
        print(f"error: not {what}: {', '.join(unknown)}", file=sys.stderr)
        return None
    return chosen


def verdict_lines(wrong: list[dict[str, Any]], refused: list[dict[str, Any]], refused_label: str) -> list[str]:
    """The summary's lines for wrong and refused models, the same in every sweep."""
    return [
        f"- wrong (verify over tolerance, or an internal error): **{len(wrong)}**"
        + (": " + "; ".join(f"{r['model']} ({r.get('why', r['status'])})" for r in wrong) if wrong else ""),
        f"- {refused_label}: {len(refused)}" + (": " + ", ".join(r["model"] for r in refused) if refused else ""),
    ]


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# -- report -----------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "load": _load()}


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_shares(r: dict[str, Any]) -> str:
    """The channels cell: prunable share of all channels / of channels outside the model's outputs / of the
    parameters (records from before issue 30 have the first only)."""
    return " / ".join(fmt_pct(r.get(k)) for k in ("channel_share", "removable_share", "param_share"))


def fmt_int(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[dict[str, Any]], timing: dict[str, Any] | None, runs: list[dict[str, Any]],
           mach: dict[str, str], ratio: float, timeout: float) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    cnns = [r for r in results if r["cnn"]]
    cnn_hit = [r for r in cnns if r.get("status") == "ok" and r["conv_share"] > CONV_TARGET]
    bad = [r for r in results if r.get("status") != "ok"]
    low = [r for r in cnns if r.get("status") == "ok" and r["conv_share"] <= CONV_TARGET]
    worst = max((r["rel_err"] for r in ok if r.get("rel_err") is not None), default=0.0)
    lines = [
        "# Model zoo: every torchvision classification model",
        "",
        "Generated by `tools/zoo.py`; do not edit by hand. Each model is built with random weights, traced in",
        "train mode (so auxiliary heads stay in the graph), analysed, and verified with",
        f"`ptgraph analyze --verify --ratio {ratio}`: a random {ratio:.0%} of the channels of every exact prunable",
        "group is removed by `shrink`, and the shrunk model's output (eval mode, one random input of 1x3x224x224,",
        "1x3x299x299 for inception_v3) is compared with the masked original. *verify* is ok when the relative",
        f"error is at most {REL_TOLERANCE:.0e} and the parameter count equals the one the groups predict.",
        "The shrunk model is then exported to ONNX (`--onnx`: TorchScript exporter, opset 17) and run in",
        "onnxruntime on another random input; *ONNX* is ok when it matches PyTorch to 1e-04 relative.",
        "",
        *(f"- command: `{r['command']}` ({r['models']} models), started {r['started']}, {r['wall_s'] / 60:.1f} min, "
          f"load average at the start {r['load']}" for r in runs),
        f"- per-model timeout {timeout:.0f} s; each model in its own process, one at a time unless --jobs says otherwise",
        f"- machine: {mach['cpu']}, {mach['cores']} cores; {mach['os']}; Python {mach['python']}",
        f"- torch {mach['torch']}, torchvision {mach['torchvision']}",
        "",
        "## Summary",
        "",
        f"- models: {len(results)}; traced, analysed and verified: **{len(ok)} / {len(results)}** "
        f"(worst relative error {worst:.1e})",
        f"- CNNs (all but {', '.join(p.rstrip('_') + '*' for p in TRANSFORMER_PREFIXES)}): {len(cnns)}; "
        f"conv-channel prunable share over {CONV_TARGET:.0%}: **{len(cnn_hit)} / {len(cnns)}**",
        f"- shrunk models that export to ONNX and match in onnxruntime: "
        f"**{sum(bool(r.get('onnx_ok')) for r in results)} / {len(results)}**",
    ]
    if bad:
        lines.append("- not verified: " + "; ".join(f"{r['model']} ({r.get('why', r['status'])})" for r in bad))
    if low:
        lines.append("- CNNs at or under the conv target: "
                     + "; ".join(f"{r['model']} {fmt_pct(r['conv_share'])}" for r in low))
    lines += [
        "",
        "Columns: *groups* / *prunable*: channel groups and how many are not frozen; *channels*: share of all",
        "channels (of every group) that are prunable / the same without groups frozen only as the model's output",
        "/ share of the parameters that prunable groups could remove; *conv ch*: share of conv output channels in prunable groups",
        "(channels that are the model's output, like SqueezeNet's classifier conv, are not counted); *rel err*:",
        "relative L2 error shrink vs mask; *params*: before -> after the random prune (always equal to the",
        "prediction when verify is ok); *t trace+an.*: trace plus channel analysis, seconds, in the subprocess",
        "(cold: the first trace in a fresh process); *note / refused*: why a model failed, untraceable",
        "submodules kept as leaves, or (CNN at or under the conv target) the largest frozen group's reason.",
        "",
        "| model | groups | prunable | channels | conv ch | verify | rel err | ONNX (ort rel err) | params before "
        "| params after | t trace+an. (s) | note / refused |",
        "| --- | ---: | ---: | ---: | ---: | :---: | ---: | :---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(results, key=lambda r: r["model"]):
        if "groups" not in r:
            lines.append(f"| {r['model']} | - | - | - | - | {r['status']} | - | - | - | - | - | {cell(r.get('why', ''))} |")
            continue
        verdict = "ok" if r["verify_ok"] else "**FAIL**"
        rel = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        t = r["trace_s"] + r["analyze_s"]
        onnx = "-" if r.get("onnx_rel_err") is None else \
            f"{'ok' if r.get('onnx_ok') else '**FAIL**'} ({r['onnx_rel_err']:.1e})"
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['prunable_groups']} | {fmt_shares(r)} | "
            f"{fmt_pct(r['conv_share'])} | {verdict} | {rel} | {onnx} | {fmt_int(r['params_before'])} | "
            f"{fmt_int(r['params_after'])} | "
            f"{t:.2f} | {cell(r.get('why', ''))} |"
        )
    lines += ["", "## Timing", ""]
    if timing is None:
        lines.append("(not run: --no-timing)")
    elif "error" in timing:
        lines.append(f"timing run failed: {timing['error']}")
    else:
        models = timing["models"]
        n_runs = len(next(iter(models.values()))["runs"])
        lines += [
            f"Trace, channel analysis and shrink (a random {ratio:.0%} plan) in one process, after one warm-up run;",
            f"median of {n_runs} runs, seconds, on the machine above ({timing['date']}; CPU, "
            f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; load average before the run: "
            f"{timing['load']}). The model is rebuilt before every run",
            "(not timed), since shrink changes it in place. `trace` includes shape propagation on meta tensors;",
            "*total* is the median of the per-run sums. Shrink time is mostly `index_select` on the weights, whose",
            "multi-threaded CPU kernel slows down sharply when another process holds a core.",
            "",
            "| model | trace | analysis | trace + analysis | shrink | total |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, t in models.items():
            ta = statistics.median(r["trace"] + r["analyze"] for r in t["runs"])
            lines.append(f"| {name} | {t['trace']:.3f} | {t['analyze']:.3f} | {ta:.3f} | "
                         f"{t['shrink']:.3f} | {t['total']:.3f} |")
        lines += [
            "",
            "Torch-Pruning's build + prune of the same models, timed in one run beside ptgraph's, is in",
            "[BENCHMARKS.md](BENCHMARKS.md) (`tools/bench_vs_torch_pruning.py`).",
        ]
    return "\n".join(lines) + "\n"


TIMM_BEGIN = "<!-- timm sweep: generated by tools/zoo.py --timm, do not edit by hand -->"
TIMM_END = "<!-- end of timm sweep -->"


def timm_section(doc: str) -> str:
    """The timm part of docs/ZOO.md (tools/zoo_timm.py writes it), kept when the torchvision part is rewritten."""
    if TIMM_BEGIN in doc and TIMM_END in doc:
        return TIMM_BEGIN + doc.split(TIMM_BEGIN, 1)[1].split(TIMM_END, 1)[0] + TIMM_END + "\n"
    return ""


def kept_sections(doc: str) -> str:
    """The timm and torchvision-task parts of docs/ZOO.md, kept when the classification part is rewritten."""
    from zoo_tasks import tasks_section  # noqa: PLC0415 - it imports this module

    timm, tasks = timm_section(doc), tasks_section(doc)
    return timm + ("\n" if timm and tasks else "") + tasks


# -- main -------------------------------------------------------------------------------------
def _load_raw(path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """The records of a --raw file, the sweeps that wrote them and the last timing (its first line)."""
    out, runs, timing = {}, [], None
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "_runs" in rec:
                    runs, timing = rec["_runs"], rec.get("_timing")
                else:
                    out[rec["model"]] = rec
    return out, runs, timing


def write_raw(path: Path, results: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
               timing: dict[str, Any] | None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    head = json.dumps({"_runs": runs, "_timing": timing}) + "\n"
    tmp.write_text(head + "".join(json.dumps(r) + "\n" for r in results.values()))
    tmp.replace(path)


def records(args: argparse.Namespace, chosen: list[str], pool: list[str]
            ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    """The --raw file's records, sweeps and timing (with --reuse), and the models to run: `chosen`, or with
    --reuse and no --models the models of `pool` the file lacks."""
    if args.raw is None or not args.reuse:
        return {}, [], None, chosen
    results, runs, timing = _load_raw(Path(args.raw))
    return results, runs, timing, chosen if args.models else [m for m in pool if m not in results]


def new_sweep(argv: list[str] | None, todo: list[str], mach: dict[str, str], runs: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """This sweep's record (command, models, start, load), added to `runs` when it has models to run."""
    command = "python tools/zoo.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run = {"command": command.strip(), "models": len(todo), "started": _now(), "wall_s": 0.0, "load": mach["load"]}
    if todo:
        runs.append(run)
    return run


def sweep(todo: list[str], run_one: Callable[[str], dict[str, Any]], jobs: int, results: dict, run: dict,
           t0: float, save: Callable[[], None]) -> None:
    """Run every model (in parallel processes when jobs > 1), a progress line each, saving after each."""
    def one(name: str) -> dict[str, Any]:
        rec = run_one(name)
        extra = f" conv {fmt_pct(rec.get('conv_share'))} rel {rec.get('rel_err')}" if "groups" in rec else ""
        print(f"[{time.perf_counter() - t0:7.0f} s] {name}: {rec['status']}{extra} {rec.get('why', '')}",
              file=sys.stderr, flush=True)
        return rec

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for rec in pool.map(one, todo):
            results[rec["model"]] = rec
            run["wall_s"] = time.perf_counter() - t0
            save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated subset (default: every classification model)")
    p.add_argument("--out", default=str(ROOT / "docs" / "ZOO.md"), help="markdown report (default: docs/ZOO.md)")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel (default: 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model (default: 600)")
    p.add_argument("--ratio", type=float, default=0.3, help="share of channels verify drops (default: 0.3)")
    p.add_argument("--raw", default=None, help="also keep one JSON record per model in this jsonl file")
    p.add_argument("--reuse", action="store_true", help="with --raw: keep its records and run only the models it "
                   "lacks, or those --models names; the report shows every record and every sweep that made them")
    p.add_argument("--no-timing", action="store_true", help="skip the timing runs (with --reuse: show the --raw file's last)")
    p.add_argument("--timing-runs", type=int, default=3, help="timed runs per model after a warm-up (default: 3)")
    p.add_argument("--timing-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timm", action="store_true", help="sweep timm (one model per family) instead of torchvision; "
                   "writes the timm section of --out")
    p.add_argument("--sizes", default=str(ROOT / "runs" / "timm_sizes.json"),
                   help="with --timm: cache of every timm model's parameter count (default: runs/timm_sizes.json)")
    p.add_argument("--no-onnx", action="store_true", help="with --timm or --tasks: skip the ONNX export")
    p.add_argument("--tasks", action="store_true", help="sweep torchvision's segmentation, video, optical-flow and "
                   "detection models instead (tools/zoo_tasks.py); writes their section of --out")
    p.add_argument("--timm-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timm-sizes-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.timm_sizes_worker or args.timm_worker or args.timm:
        import zoo_timm  # noqa: PLC0415 - imports this module's helpers back

    if args.timm_sizes_worker:
        print(json.dumps(zoo_timm.timm_sizes_worker()))
        return 0
    if args.timm_worker:
        print(json.dumps(zoo_timm.timm_worker(args.timm_worker, args.ratio, 0, not args.no_onnx), default=str))
        return 0
    if args.timm:
        return zoo_timm.main_timm(args, argv)
    if args.tasks:
        import zoo_tasks  # noqa: PLC0415 - imports this module's helpers back

        return zoo_tasks.main_tasks(args, argv)

    if args.timing_worker:
        models = args.models.split(",") if args.models else list(TIMING_MODELS)
        print(json.dumps(timing_worker(models, args.timing_runs, args.ratio)))
        return 0

    everything = torchvision_models()
    chosen = chosen_models(args.models, everything, everything, "torchvision classification models")
    if chosen is None:
        return 2
    raw = Path(args.raw) if args.raw else None
    results, runs, timing, todo = records(args, chosen, everything)
    mach = machine()
    run = new_sweep(argv, todo, mach, runs)
    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    sweep(todo, lambda name: run_model(name, args.ratio, args.timeout, threads), args.jobs, results, run, t0,
           lambda: write_raw(raw, results, runs, timing) if raw is not None else None)
    if not args.no_timing:  # else the last timing the --raw file holds, if any
        print("timing ...", file=sys.stderr, flush=True)
        timing = run_timing(list(TIMING_MODELS), args.timing_runs, args.ratio, args.timeout * 2)
        if raw is not None:
            write_raw(raw, results, runs, timing)
    shown = [results[m] for m in (everything if raw is not None and args.reuse else chosen) if m in results]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = kept_sections(out.read_text()) if out.exists() else ""
    out.write_text(render(shown, timing, runs, mach, args.ratio, args.timeout) + ("\n" + kept if kept else ""))
    n_ok = sum(r.get("status") == "ok" for r in shown)
    print(f"{n_ok}/{len(shown)} verified; wrote {out}", file=sys.stderr)
    return 0 if n_ok == len(shown) else 1


if __name__ == "__main__":
    sys.exit(main())
