"""The `ptgraph` command line's arguments: `analyze`, `export` and `prune-train` (its flags grouped by purpose).
ptgraph/cli.py runs the commands."""
from __future__ import annotations

import argparse
from typing import Callable


class _Defaults(argparse.HelpFormatter):
    """Appends '(default: X)' to a help line unless it already names its default or has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # an on/off flag: off unless given
        if "default" in text or flag or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _train_parser(sub, run: Callable[[argparse.Namespace], int]) -> None:
    from ptgraph.trainers.budget import ALLOCATIONS

    p = sub.add_parser("prune-train", help="train from scratch with group lasso, shrinking the model as it trains",
                       formatter_class=_Defaults,
                       description="Train a model from scratch with PruneTrain: a group lasso drives whole channels "
                                   "to zero and the model is shrunk in place as it trains (by default to half its "
                                   "forward FLOPs by 30% of the steps). docs/USER_GUIDE.md explains every flag.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="model spec: torchvision:NAME, ptgraph:resnet32, timm:NAME, module:callable, "
                                                    "run:RUN_DIR (a run's final architecture, fresh)")
    g.add_argument("--data", default="synthetic",
                   help="synthetic[:easy], cifar10:PATH, cifar100:PATH, cifar10-npz:PATH, imagenet:PATH, "
                        "tokens:PATH (nanoGPT's PATH/train.bin and val.bin, uint16) or tokens:synthetic")
    g.add_argument("--download", action="store_true", help="download CIFAR into its PATH if missing")
    g.add_argument("--block-size", type=int, default=None,
                   help="token data: tokens per training and validation block (default: the model's block_size, else 128)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 182 CIFAR, 90 ImageNet, 8 synthetic)")
    g.add_argument("--steps-per-epoch", type=int, default=None, help="cap on steps per epoch, for short runs (default: no cap)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch per process (default: 128 CIFAR, 256 ImageNet, 64 synthetic)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.1 x batch/128 CIFAR, /256 ImageNet)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: 5e-4 CIFAR, 1e-4 ImageNet)")
    g.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="learning rate: step is x0.1 at 50/75%% of the epochs (CIFAR) or 45/67/90%% (ImageNet); "
                        "cosine decays it per epoch towards 0")
    g.add_argument("--seed", type=int, default=0, help="random seed: initialisation and data order")

    g = p.add_argument_group("budget", "prune to a share of the dense FLOPs (the default)")
    g.add_argument("--target-flops", type=float, default=None,
                   help="end with this share of the dense forward FLOPs, reached gradually by --prune-until; the lasso "
                        "strength is steered there (default: 0.5, unless --penalty-ratio is given)")
    g.add_argument("--prune-until", type=float, default=None,
                   help="share of the training steps by which the target is reached; the rest trains the smaller "
                        "network plainly (default: 0.3)")
    g.add_argument("--prune-schedule", choices=("cubic", "linear"), default=None,
                   help="FLOPs from dense to the target: cubic cuts most early, linear evenly (default: cubic)")
    g.add_argument("--reconfigurations", type=int, default=None,
                   help="shrinks on the way to the target (default: 8)")
    g.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how each cut is spread over the channel groups: uniform (every group keeps the same share of "
                        "its channels, its smallest norms going first), global (one ranking of norms relative to "
                        "their group's, never more than the target's share of a group), sensitivity (uniform, "
                        "tilted towards the groups whose next channels change the output least per FLOP, measured "
                        "on a training batch at every reconfiguration) or config (the same heads and MLP units in every block of "
                        "a repeated stack, one hidden size, widths in multiples of 8: a shape a model's config can "
                        "express) (default: uniform; global with --compute-aware)")
    g.add_argument("--compute-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="rank channels by norm per FLOP they cost, so that costly channels go first (implies "
                        "--allocation global; default: off)")
    g.add_argument("--round-to", type=int, default=None,
                   help="keep a multiple of this many channels per group (default: 8 on CUDA, for tensor cores; 1 on the CPU)")
    g.add_argument("--threshold", type=float, default=1e-4, help="channels with a group norm under this are removed")
    g.add_argument("--exact-only", action="store_true",
                   help="prune only groups whose removal is exact (not streams normalised by LayerNorm)")
    g.add_argument("--dense", action="store_true", help="train without lasso or shrinking: the baseline")

    g = p.add_argument_group("the paper's method", "a fixed penalty ratio instead of a FLOPs target")
    g.add_argument("--penalty-ratio", type=float, default=None,
                   help="lambda fixed at the first step so that the lasso is this share of the loss (the paper: 0.2 "
                        "for 182 CIFAR epochs); how much it removes depends on the model and the schedule")
    g.add_argument("--reconfig-every", type=int, default=None,
                   help="epochs between reconfigurations (default: 10 with --penalty-ratio; with a target, "
                        "--reconfigurations spread over the schedule)")
    g.add_argument("--reconfig-steps", type=int, default=None,
                   help="steps between reconfigurations, overriding --reconfig-every (default: off)")
    g.add_argument("--lasso", choices=("proximal", "subgradient"), default="proximal",
                   help="proximal: group soft-thresholding after each step (exact zeros); subgradient: the penalty in "
                        "the loss, as in the paper (with --penalty-ratio only)")

    g = p.add_argument_group("performance")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA: auto picks bf16 where supported, else fp16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (recompiled after each shrink)")
    g.add_argument("--workers", type=int, default=None, help="data loader workers (default: 4 on CUDA, 0 on CPU)")
    g.add_argument("--data-on-device", choices=("auto", "on", "off"), default="auto",
                   help="decode the data set once and keep it on the device, augmenting there (auto: on CUDA, for "
                        "CIFAR and synthetic data)")
    g.add_argument("--prox-every", type=int, default=1,
                   help="proximal thresholding every N steps, with N steps' strength (fewer kernels on GPUs)")
    g.add_argument("--dynamic-batch", action="store_true",
                   help="grow the batch as shrinking frees memory, the learning rate scaled with it")
    g.add_argument("--max-batch", type=int, default=None, help="cap for --dynamic-batch (default: 4x --batch-size)")

    g = p.add_argument_group("distributed")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU): relaunches this command under torchrun")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across the processes with FSDP2 (one unit "
                        "per repeated block and one at the root) instead of DDP's whole copies; needs 2+ processes")
    g.add_argument("--no-scale-lr", dest="scale_lr", action="store_false",
                   help="with several processes, keep --lr as given instead of multiplying it by their number")
    g.add_argument("--sync-bn", action="store_true", help="with several GPUs, BatchNorm statistics over the global batch")
    g.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a process waits for a stalled or dead peer before the run stops")

    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="where metrics, report and checkpoint go (default: runs/MODEL-DATE)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="do not write TensorBoard events")
    g.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(run=run)


def _input_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-dtype", choices=("float", "long"), default=None,
                   help="example input: float (random normal) or long (random token ids in [0, vocab) of the model's "
                        "first nn.Embedding, e.g. with --input-shape 2,128) (default: long for ptgraph:gpt and a "
                        "run's own, else float)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: torchvision:NAME[?k=v], timm:NAME, module:callable or run:RUN_DIR")
    p.add_argument("--input-shape", action="append", default=None,
                   help="example input shape, e.g. 1,3,224,224; once per input of a forward that takes several "
                        "(default: the model's; a clip of 1,C,16,112,112 when its first conv is 3-D)")
    _input_dtype(p)
    p.add_argument("--mode", choices=("train", "eval"), default="train",
                   help="mode to trace in; train keeps training-only branches such as auxiliary heads (default: train)")
    p.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                   help="keep this submodule as one node (its boundary channels are frozen); repeatable")
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="never prune this submodule's channels; repeatable")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The parser; `commands` maps each subcommand to the function that runs it."""
    parser = argparse.ArgumentParser(prog="ptgraph", description="PruneTrain for any PyTorch model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="trace a model and show its channel groups")
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--verify", action="store_true",
                   help="prune a random share of every exact group and check shrink against mask")
    p.add_argument("--ratio", type=float, default=0.3, help="share of channels --verify drops (default: 0.3)")
    p.add_argument("--onnx", action="store_true", help="with --verify: also export the shrunk model and check it in onnxruntime")
    p.add_argument("--draw", default=None, metavar="FILE",
                   help="draw the graph coloured by channel group, frozen ones marked, to FILE (.svg, .png or .pdf)")
    p.add_argument("--meta", action="store_true",
                   help="build the model on the meta device (shapes, no weights): analyse and plan models too large "
                        "for this machine")
    p.add_argument("--target-flops", type=float, default=None, metavar="SHARE",
                   help="also plan the model's shapes to SHARE of its FLOPs (uniform widths) and report the plan")
    p.add_argument("--round-to", type=int, default=1, help="with --target-flops: widths in multiples of this")
    p.set_defaults(run=commands["analyze"])
    p = sub.add_parser("export", help="export a pruned run (or a model spec) to ONNX, checked against onnxruntime")
    p.add_argument("source", nargs="?", default=None, help="a prune-train run directory or its checkpoint.pt")
    p.add_argument("--model", default=None, help="export a model spec straight away instead (no training)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--input-shape", action="append", default=None,
                   help="input shape to export with, once per input (default: the traced ones, batch 1)")
    _input_dtype(p)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--leaf", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--ignore", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(run=commands["export"], mode="eval")
    _train_parser(sub, commands["prune-train"])
    return parser
