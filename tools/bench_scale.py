"""What one reconfiguration costs as models grow: Llama-style models from ~10M to ~600M parameters, and
Llama-2-7B's shapes on the meta device.

Per model, in a fresh process (one thread): capture (ptgraph.trace), analysis (the PruneTrain object:
channel groups and dense FLOPs), then one reconfiguration to --target of the FLOPs, split into planning
(channel norms and the bisection over plans), the self-check and the shrink, with the peak memory the
reconfiguration adds over the process's memory just before it (sampled every 2 ms from /proc/self/statm),
in copies of the parameters. Beside it, Torch-Pruning's `DependencyGraph().build_dependency` on the same
model where Torch-Pruning is installed (`pip install -e '.[bench]'`). The 7B row traces, analyses and
plans the shapes (`shape_plan`) without allocating a weight.

    python tools/bench_scale.py [--sizes 256x4,512x8,1024x12,1536x16] [--meta-7b] [--no-torch-pruning]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident memory seen while the block runs, sampled in a thread."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.peak, self.before = every_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def llama(hidden: int, layers: int, vocab: int = 8192) -> Callable[[], torch.nn.Module]:
    """A Llama-style causal LM: head size 64, a quarter as many kv heads (grouped), an MLP 4x the hidden size."""
    import transformers as tf

    heads = max(1, hidden // 64)
    config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=max(1, heads // 4), intermediate_size=4 * hidden, vocab_size=vocab,
                            max_position_embeddings=256, use_cache=False)
    return lambda: tf.LlamaForCausalLM(config)


def llama2_7b() -> torch.nn.Module:
    import transformers as tf

    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                              max_position_embeddings=4096, use_cache=False))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def one_model(size: str, target: float, tokens: int, torch_pruning: bool) -> dict[str, Any]:
    """Everything for one model, in this process."""
    from ptgraph import trace
    from ptgraph.trainers import PruneTrain

    hidden, layers = (int(v) for v in size.split("x"))
    torch.manual_seed(0)
    model = llama(hidden, layers)()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 8192, (1, tokens))
    row: dict[str, Any] = {"model": f"Llama-style {hidden}x{layers}", "params": params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, row["capture_s"] = timed(lambda: trace(model, (ids,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # the schedule's point at the first reconfiguration: one cut to the target
    pt, row["analysis_s"] = timed(lambda: PruneTrain(graph, (ids,), opt, target_flops=target, total_steps=10,
                                                     prune_until=0.1, reconfigurations=1))
    pt.steps = pt.schedule.until
    with PeakRSS() as mem:
        r = pt.reconfigure()
    assert r is not None
    row["reconfigure_s"] = r.seconds
    row["check_s"] = pt.check_seconds
    row["shrink_s"] = r.report.seconds - pt.check_seconds
    row["plan_s"] = r.seconds - r.report.seconds
    row["extra_peak_gb"] = (mem.peak - mem.before) / 1e9
    row["extra_peak_copies"] = (mem.peak - mem.before) / (4 * params)
    row["flops_share"] = pt.flops / pt.dense_flops
    row["frozen"] = sorted(pt.frozen)
    if torch_pruning:
        row.update(torch_pruning_dependency(hidden, layers, ids))
    return row


def torch_pruning_dependency(hidden: int, layers: int, ids: torch.Tensor) -> dict[str, Any]:
    try:
        import torch_pruning as tp
    except ImportError:
        return {"tp_s": None, "tp_note": "not installed"}
    torch.manual_seed(0)
    model = llama(hidden, layers)()
    try:
        _, seconds = timed(lambda: tp.DependencyGraph().build_dependency(
            model, example_inputs=ids, output_transform=lambda out: out.logits))
        return {"tp_s": seconds, "tp_note": ""}
    except Exception as e:  # noqa: BLE001 - a foreign tool's failure is a row, not a crash
        return {"tp_s": None, "tp_note": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}


def meta_7b(target: float, tokens: int) -> dict[str, Any]:
    from ptgraph import trace
    from ptgraph.passes import analyze_channels, count_params
    from ptgraph.trainers.planning import shape_plan

    with torch.device("meta"):
        model = llama2_7b()
    ids = torch.randint(0, 32000, (1, tokens))
    row: dict[str, Any] = {"model": "Llama-2-7B shapes (meta)", "params": count_params(model)}
    with PeakRSS() as mem:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, row["capture_s"] = timed(lambda: trace(model, (ids,)))
        analysis, row["analysis_s"] = timed(lambda: analyze_channels(graph))
        (plan, flops), row["plan_s"] = timed(lambda: shape_plan(analysis, target))
    from ptgraph.cost import forward_flops

    row["flops_share"] = flops / forward_flops(graph.module)
    row["peak_gb"] = mem.peak / 1e9
    return row


def run_child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"model": " ".join(args), "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | capture | analysis | plan | self-check | shrink | reconfiguration | extra peak memory "
             "| FLOPs after | Torch-Pruning build_dependency |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |")
            continue
        fmt = lambda k: f"{r[k]:.2f} s" if r.get(k) is not None else "-"  # noqa: E731
        mem = (f"{r['extra_peak_gb']:.2f} GB ({r['extra_peak_copies']:.2f} x params)" if "extra_peak_gb" in r
               else f"process peak {r['peak_gb']:.2f} GB")
        tp = fmt("tp_s") if r.get("tp_s") is not None else (r.get("tp_note") or "-")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {fmt('capture_s')} | {fmt('analysis_s')} | "
                     f"{fmt('plan_s')} | {fmt('check_s')} | {fmt('shrink_s')} | {fmt('reconfigure_s')} | {mem} | "
                     f"{r['flops_share']:.3f} | {tp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256x4,512x8,1024x12,1536x16", help="HIDDENxLAYERS, comma-separated")
    p.add_argument("--target", type=float, default=0.5, help="share of the dense FLOPs the reconfiguration cuts to")
    p.add_argument("--tokens", type=int, default=32, help="example sequence length (batch 1)")
    p.add_argument("--meta-7b", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--torch-pruning", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:  # one model in this fresh process; prints its row as JSON
        torch.set_num_threads(1)
        row = (meta_7b(args.target, args.tokens) if args.child == "meta-7b"
               else one_model(args.child, args.target, args.tokens, args.torch_pruning))
        print(json.dumps(row))
        return 0
    print(f"one thread per model, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.2f}; target {args.target:g}, {args.tokens} tokens\n", flush=True)
    rows = []
    common = ["--target", str(args.target), "--tokens", str(args.tokens)]
    for size in args.sizes.split(","):
        flag = "--torch-pruning" if args.torch_pruning else "--no-torch-pruning"
        rows.append(run_child(["--child", size, flag, *common]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.meta_7b:
        rows.append(run_child(["--child", "meta-7b", *common]))
    print(markdown(rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
