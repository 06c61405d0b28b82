"""Draw a traced graph with its channel groups, so a user can see where a group is coupled or frozen.

One box per op (a chain of ops with one output group, conv -> bn -> relu, is one box), laid out
top-down in layers by data flow; each box is filled with the colour of the group(s) along its
output's channel axis. The table from `analyze` says *that* a group is frozen; the drawing shows
*where*. Only matplotlib and networkx: graphviz would need a system binary.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import networkx as nx
import numpy as np
import torch.fx as fx
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch, Rectangle
from matplotlib.path import Path as MPath

from ptgraph.errors import UserError

FORMATS = (".svg", ".png", ".pdf")
BOX_W, BOX_H = 2.6, 0.42  # inches: every box has the same size, the figure grows with the graph
LAYER_STEP = 0.74  # inches between layers
GAP = 0.3  # inches between neighbouring boxes of one layer
DUMMY_W = 0.22  # the width an edge passing through a layer takes
LEGEND_W = 4.8
MARGIN = 0.3
FONT = 6.5
MAX_LEGEND_GROUPS = 16
MAX_LEGEND_REASONS = 24
FROZEN, HATCH, UNTYPED, MIXED, EDGE = "#cfcfcf", "#9a9a9a", "#ffffff", "#f2f2f2", "#8a8a8a"
BAR = 0.1  # inches: the bar that shows a concatenation's groups


@dataclass
class _Box:
    nodes: list[fx.Node]  # a chain, in data-flow order; the box's output is the last node's
    groups: tuple[tuple[int, int], ...]  # (group id, channels) along the output's channel axis, in axis order
    layer: int = 0
    x: float = 0.0
    note: str | None = None  # a module kept whole: untraceable leaf, ignored


def draw(analysis: Any, path: str | Path, collapse: bool = True) -> Path:
    """Write the graph of `analysis` (a ChannelAnalysis) to `path` (.svg, .png or .pdf) and return the path.

    `collapse` merges chains of ops whose output carries the same groups into one box (every edge
    between boxes is kept): a ResNet-50 takes 68 rows instead of 169.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--draw '{path}': cannot draw a '{path.suffix or 'no extension'}' file; "
                        f"name it .svg, .png or .pdf")
    boxes, edges = _boxes(analysis, collapse)
    points = _layout(boxes, edges)
    _render(analysis, boxes, points, path)
    return path


# -- what goes in a box -------------------------------------------------------------------------
def _is_tensor_shape(shape: Any) -> bool:
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return True
    return isinstance(shape, tuple) and any(_is_tensor_shape(s) for s in shape if isinstance(s, tuple))


def _shown(node: fx.Node, types: dict) -> bool:
    """Tensors only: shape reads, asserts and scalar arithmetic (a ViT has a hundred) carry no channels,
    and a parameter an op reads as its weight (F.layer_norm's) belongs to that op; one used as data
    (a class token, a layer scale) is typed by the flow and shown."""
    if node.op == "get_attr":
        return node in types
    return node.op in ("placeholder", "output") or _is_tensor_shape(node.meta.get("shape"))


def _tensor_types(t: Any) -> list[dict]:
    if isinstance(t, dict):
        return [t] if t else []
    if isinstance(t, tuple):
        return [x for ti in t for x in _tensor_types(ti)]
    return []


def _output_groups(analysis: Any, node: fx.Node) -> tuple[tuple[int, int], ...]:
    """Groups along the output's channel axis (the last tracked axis: C of NCHW, D of NLD), with their
    channel counts, in the order they first appear along it (a concatenation's order)."""
    flow = analysis.flow
    parts = [t[max(t)] for t in _tensor_types(flow.types.get(node))]
    if not parts:
        return ()
    ids = np.concatenate(parts)
    ids = ids[flow.alive[ids]] if len(flow.alive) else ids
    if not len(ids):
        return ()
    groups = analysis._group_of_elements(ids)
    roots = flow.space.find(ids)
    uniq, first = np.unique(groups, return_index=True)
    return tuple((int(g), len(np.unique(roots[groups == g]))) for g in uniq[np.argsort(first)])


def _has_params(node: fx.Node) -> bool:
    """A layer of its own: where no channels are tracked, a module with weights still gets its own box."""
    module = node.graph.owning_module.get_submodule(node.target) if node.op == "call_module" else None
    return module is not None and next(module.parameters(), None) is not None


def _kind(node: fx.Node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return {"placeholder": "input", "get_attr": "tensor", "output": "output"}[node.op]


def _title(node: fx.Node, chars: int) -> str:
    """'Conv2d layer1.0.conv1', 'add (add_3)'; a long module name loses its start, never the type."""
    kind = _kind(node)
    if node.op in ("call_module", "get_attr", "placeholder"):
        return f"{kind} {_short(str(node.target), max(chars - len(kind) - 1, 8))}"
    return _short(kind if node.name == kind else f"{kind} ({node.name})", chars)


def _boxes(analysis: Any, collapse: bool) -> tuple[list[_Box], nx.DiGraph]:
    """Boxes in data-flow order and the graph of edges between them (by box index)."""
    graph = analysis.graph
    flow = graph.to_networkx()  # node name -> its inputs and users
    nodes = [n for n in graph.module.graph.nodes if _shown(n, analysis.flow.types)]  # fx order: topological
    by_name = {n.name: n for n in nodes}
    kept_whole = {**{m: "untraceable leaf" for m in graph.leaves}, **{m: "ignored" for m in graph.ignored}}
    box_of: dict[str, int] = {}
    boxes: list[_Box] = []
    for n in nodes:
        groups = _output_groups(analysis, n)
        note = kept_whole.get(n.target) if n.op == "call_module" else None
        ins = [p for p in flow.predecessors(n.name) if p in by_name]  # scalars (sizes) do not count
        if collapse and len(ins) == 1 and note is None and n.op not in ("output", "placeholder"):
            prev = boxes[box_of[ins[0]]]
            users = [u for u in flow.successors(ins[0]) if u in by_name]
            if (prev.nodes[-1].name == ins[0] and users == [n.name] and prev.groups == groups and prev.note is None
                    and prev.nodes[0].op not in ("placeholder", "get_attr") and (groups or not _has_params(n))):
                prev.nodes.append(n)  # same channels in, same channels out: one box
                box_of[n.name] = box_of[ins[0]]
                continue
        box_of[n.name] = len(boxes)
        boxes.append(_Box([n], groups, note=note))
    edges = nx.DiGraph()
    edges.add_nodes_from(range(len(boxes)))
    edges.add_edges_from((box_of[a], box_of[b]) for a, b in flow.edges
                         if a in box_of and b in box_of and box_of[a] != box_of[b])
    return boxes, edges


# -- layout ---------------------------------------------------------------------------------------
def _layout(boxes: list[_Box], edges: nx.DiGraph) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """Layered (Sugiyama-style) layout: longest-path layers, a point per layer for long edges,
    barycentre ordering, then x positions pulled towards neighbours (straight chains).
    Sets each box's layer and x; returns each edge's route through the layers it crosses."""
    n = len(boxes)
    preds = [sorted(edges.predecessors(i)) for i in range(n)]
    succs = [sorted(edges.successors(i)) for i in range(n)]
    for layer, generation in enumerate(nx.topological_generations(edges)):
        for i in generation:
            boxes[i].layer = layer
    fed = [False] * n  # boxes an input reaches sit as high as they can; parameter-only ones just above their use
    for i, b in enumerate(boxes):
        fed[i] = b.nodes[0].op == "placeholder" or any(fed[p] for p in preds[i])
    for i in reversed(range(n)):
        if not fed[i] and succs[i]:
            boxes[i].layer = min(boxes[s].layer for s in succs[i]) - 1
    low = min((b.layer for b in boxes), default=0)  # a parameter chain may reach above the input
    layer_of = [b.layer - low for b in boxes]  # items: the boxes, then a bend per layer an edge crosses
    for b, layer in zip(boxes, layer_of):
        b.layer = layer
    is_dummy = [False] * n
    up: list[list[int]] = [list(p) for p in preds]
    down: list[list[int]] = [list(s) for s in succs]
    routes: dict[tuple[int, int], list[int]] = {}
    origin: dict[int, int] = {}  # a long edge's bend -> the box it comes from
    dest: dict[int, int] = {}  # ... and the box it goes to
    for a, b in sorted(edges.edges):
        chain = [a]
        for layer in range(layer_of[a] + 1, layer_of[b]):
            layer_of.append(layer)
            is_dummy.append(True)
            up.append([chain[-1]])
            down.append([])
            down[chain[-1]].append(len(layer_of) - 1)
            chain.append(len(layer_of) - 1)
            origin[chain[-1]], dest[chain[-1]] = a, b
        if len(chain) > 1:
            down[a].remove(b)
            up[b].remove(a)
            down[chain[-1]].append(b)
            up[b].append(chain[-1])
        routes[(a, b)] = chain + [b]
    layers: list[list[int]] = [[] for _ in range(max(layer_of, default=0) + 1)]
    for i in range(len(layer_of)):
        layers[layer_of[i]].append(i)
    rank = {i: k for layer in layers for k, i in enumerate(layer)}
    for sweep in range(6):  # barycentre ordering, alternately from above and below
        neighbours, seq = (up, layers[1:]) if sweep % 2 == 0 else (down, layers[-2::-1])
        for layer in seq:
            key = {i: (sum(rank[j] for j in neighbours[i]) / len(neighbours[i]) if neighbours[i] else rank[i])
                   for i in layer}
            layer.sort(key=lambda i: key[i])
            rank.update({i: k for k, i in enumerate(layer)})
    width = [DUMMY_W if d else BOX_W for d in is_dummy]
    x = np.zeros(len(layer_of))
    for layer in layers:
        x[layer] = np.cumsum([0] + [(width[a] + width[b]) / 2 + GAP for a, b in zip(layer, layer[1:])])
    for sweep in range(8):  # pull each item towards its neighbours' median, keeping the order
        neighbours = up if sweep % 2 == 0 else down
        end = origin if sweep % 2 == 0 else dest
        for layer in filter(None, layers):
            want = np.array([_target(x, neighbours[i], is_dummy, end if not is_dummy[i] else {}) if neighbours[i]
                             else x[i] for i in layer])
            seps = [0.0] + [(width[a] + width[b]) / 2 + GAP * (0.5 if is_dummy[a] and is_dummy[b] else 1)
                            for a, b in zip(layer, layer[1:])]
            x[layer] = _pack(want, np.cumsum(seps), np.array([0.01 if is_dummy[i] else 1.0 for i in layer]))
    x -= min(x[i] - width[i] / 2 for i in range(len(x))) - MARGIN
    for i, b in enumerate(boxes):
        b.x = float(x[i])
    return {e: [(float(x[i]), _y(layer_of[i])) for i in chain] for e, chain in routes.items()}


def _target(x: np.ndarray, neighbours: list[int], is_dummy: list[bool], end: dict[int, int]) -> float:
    """Where an item would like to be: a box, at the median of the boxes it connects to (a long edge
    counts as the box at its far end, wherever its bends were pushed); an edge's bend, under its last bend."""
    if len(neighbours) == 1:  # most items: plain Python, numpy's median is slow on one number
        return float(x[end.get(neighbours[0], neighbours[0])])
    v = sorted(float(x[end.get(j, j)]) for j in neighbours)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def _y(layer: int) -> float:
    return MARGIN + BOX_H / 2 + layer * LAYER_STEP


def _pack(want: np.ndarray, offsets: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Positions closest (weighted least squares) to `want` with x[i] - x[i-1] >= the given gaps: pool
    adjacent violators. Edges weigh little, so boxes stay where their neighbours are and edges step aside."""
    blocks: list[list[float]] = []  # [weighted sum, weight, count]
    for v, w in zip(want - offsets, weight):
        blocks.append([v * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += c
    fit = np.concatenate([np.full(c, s / w) for s, w, c in blocks])
    return fit + offsets


# -- drawing --------------------------------------------------------------------------------------
def _style(analysis: Any) -> dict[int, dict]:
    """Per group: fill, hatch, dashed border. Prunable groups cycle through 18 colours by id, so neighbours
    differ; none is grey (grey means frozen), and tab10's are lightened so that black text stays readable."""
    palette = [tuple(0.85 * np.array(c) + 0.15) for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    palette += [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 and i != 15]
    out = {g.id: {"color": FROZEN, "hatch": "////", "dashed": False} for g in analysis.groups if not g.prunable}
    prunable = [g for g in analysis.groups if g.prunable]
    out.update({g.id: {"color": palette[k % len(palette)], "hatch": None, "dashed": not g.exact}
                for k, g in enumerate(prunable)})
    return out


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _render(analysis: Any, boxes: list[_Box], routes: dict, path: Path) -> None:
    style = _style(analysis)
    legend = _legend_lines(analysis, style)
    graph_w = max((b.x + BOX_W / 2 for b in boxes), default=BOX_W) + MARGIN
    graph_h = max((_y(b.layer) + BOX_H / 2 for b in boxes), default=BOX_H) + MARGIN
    legend_h = MARGIN * 2 + sum(0.16 * len(lines) + 0.06 for _, lines in legend)
    fig_w, fig_h = graph_w + LEGEND_W, max(graph_h, legend_h)
    with matplotlib.rc_context({"svg.fonttype": "none", "hatch.linewidth": 0.5, "font.size": FONT}):
        fig = Figure(figsize=(fig_w, fig_h))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, fig_w)
        ax.set_ylim(fig_h, 0)  # inches, from the top left
        ax.axis("off")
        _draw_edges(ax, routes)
        groups = {g.id: g for g in analysis.groups}
        for b in boxes:
            _draw_box(ax, b, style, groups)
        _draw_legend(ax, legend, graph_w + 0.1)
        dpi = min(110, int(60000 / max(fig_w, fig_h)))  # raster formats cap the pixels per side
        try:
            fig.savefig(path, dpi=dpi, format=path.suffix[1:].lower())
        except OSError as e:
            raise UserError(f"--draw: cannot write '{path}' ({e.strerror or e}); pick a writable path") from None


def _draw_edges(ax: Any, routes: dict) -> None:
    """Every edge as one path: an S-curve between layers, straight down through the layers it crosses."""
    verts, codes = [], []
    for pts in routes.values():
        (x0, y0), rest = pts[0], pts[1:]
        verts.append((x0, y0 + BOX_H / 2))
        codes.append(MPath.MOVETO)
        for k, (x1, y1) in enumerate(rest):
            top = y1 - BOX_H / 2
            mid = (y0 + BOX_H / 2 + top) / 2
            verts += [(x0, mid), (x1, mid), (x1, top)]
            codes += [MPath.CURVE4] * 3
            if k < len(rest) - 1:
                verts.append((x1, y1 + BOX_H / 2))
                codes.append(MPath.LINETO)
            x0, y0 = x1, y1
    if verts:
        ax.add_patch(PathPatch(MPath(verts, codes), facecolor="none", edgecolor=EDGE, lw=0.6, zorder=1))
        heads = [pts[-1] for pts in routes.values()]
        ax.scatter([p[0] for p in heads], [p[1] - BOX_H / 2 for p in heads], marker="v", s=6, c=EDGE,
                   linewidths=0, zorder=2)


def _draw_legend(ax: Any, legend: list, x0: float) -> None:
    y = MARGIN
    for k, (swatch, lines) in enumerate(legend):
        if swatch is not None:
            ax.add_patch(Rectangle((x0, y + 0.02), 0.28, 0.12, facecolor=swatch["color"], hatch=swatch["hatch"],
                                   edgecolor=swatch.get("edge", "#444"), lw=1.0 if "edge" in swatch else 0.5,
                                   ls="--" if swatch["dashed"] else "-"))
        for j, line in enumerate(lines):
            title = k == 0 and j == 0
            ax.text(x0 + (0.36 if swatch is not None else 0), y + 0.08 + 0.16 * j, line, va="center",
                    fontsize=FONT + (1.5 if title else 0), fontweight="bold" if title else "normal")
        y += 0.16 * len(lines) + 0.06


def _draw_box(ax: Any, b: _Box, style: dict, groups: dict) -> None:
    left, top = b.x - BOX_W / 2, _y(b.layer) - BOX_H / 2
    if len(b.groups) == 1:
        s = style[b.groups[0][0]]
        ax.add_patch(Rectangle((left, top), BOX_W, BOX_H, facecolor=s["color"], hatch=s["hatch"], lw=0, zorder=3,
                               edgecolor=HATCH))  # the hatch's colour: light, so the text stays readable
    else:  # none, or a concatenation: a light box with a bar of each group's share of the channels
        ax.add_patch(Rectangle((left, top), BOX_W, BOX_H, facecolor=UNTYPED if not b.groups else MIXED, lw=0,
                               zorder=3))
        total, x = sum(c for _, c in b.groups), left
        for gid, count in b.groups:
            w = BOX_W * count / total
            ax.add_patch(Rectangle((x, top + BOX_H - BAR), w, BAR, facecolor=style[gid]["color"],
                                   hatch=style[gid]["hatch"], lw=0, zorder=3, edgecolor=HATCH))
            x += w
    dashed = any(style[g]["dashed"] for g, _ in b.groups)
    red = b.note is not None
    ax.add_patch(Rectangle((left, top), BOX_W, BOX_H, facecolor="none", zorder=4,
                           edgecolor="#b00000" if red else "#333", lw=1.2 if red else 0.6, ls="--" if dashed else "-"))
    chars = int(BOX_W * 72 / (FONT * 0.58))
    fill = np.array(matplotlib.colors.to_rgb(style[b.groups[0][0]]["color"] if len(b.groups) == 1 else UNTYPED))
    ink = "white" if fill @ [0.299, 0.587, 0.114] < 0.5 else "black"  # dark fills get white text
    one_line = b.nodes[0].op == "output"
    title = _title(b.nodes[0], int(chars * 0.92))  # bold is wider
    ax.text(left + 0.06, top + BOX_H * (0.5 if one_line else 0.28), title, va="center", zorder=5,
            fontweight="bold", color=ink)
    tags = " + ".join(f"g{g} ({c})" + ("" if groups[g].prunable else " frozen") for g, c in b.groups[:3])
    tags += (" + …" if len(b.groups) > 3 else "") + (" ~inexact" if dashed else "")
    more = [_kind(n) for n in b.nodes[1:]]
    line2 = "  ".join(x for x in (tags, ("+" + ", ".join(more)) if more else "", b.note) if x)
    if not line2 and b.nodes[-1].op != "output":
        shape = b.nodes[-1].meta.get("shape")
        dims = "×".join(map(str, shape)) if shape and all(isinstance(d, int) for d in shape) else ""
        line2 = "no tracked channel axis" + (f" · {dims}" if dims else "")
    line2 = line2 if len(line2) <= chars else line2[:chars - 1] + "…"
    ax.text(left + 0.06, top + BOX_H * (0.58 if len(b.groups) > 1 else 0.7), line2, va="center", zorder=5, color=ink)


def _legend_lines(analysis: Any, style: dict) -> list[tuple[dict | None, list[str]]]:
    """(swatch or None, lines): a title, the largest prunable groups, then frozen groups by reason."""
    gs = analysis.groups
    name = type(analysis.graph.module).__name__
    prunable = [g for g in gs if g.prunable]
    out: list[tuple[dict | None, list[str]]] = [(None, [
        f"{name}: {len(gs)} channel groups, {len(prunable)} prunable",
        "box colour: the group(s) of the output's channel axis, gN (channels)",
    ])]
    wrap = int((LEGEND_W - 0.5) * 72 / (FONT * 0.56))

    def examples(g: Any) -> str:
        names = sorted({m.name.rsplit(".", 1)[0] for m in g.members})
        return ", ".join(names[:2]) + (f" +{len(names) - 2}" if len(names) > 2 else "")

    for g in sorted(prunable, key=lambda g: (-g.size * max(len(g.members), 1), g.id))[:MAX_LEGEND_GROUPS]:
        text = f"g{g.id} ({g.size})  {examples(g)}" + ("" if g.exact else f"  ~inexact: {g.reason}")
        out.append((style[g.id], textwrap.wrap(text, wrap, subsequent_indent="   ")))
    if len(prunable) > MAX_LEGEND_GROUPS:
        out.append((None, [f"… {len(prunable) - MAX_LEGEND_GROUPS} smaller prunable groups (named in their boxes)"]))
    by_reason: dict[str, list[int]] = {}
    for g in gs:
        if not g.prunable:
            by_reason.setdefault(g.reason or "frozen", []).append(g.id)
    for k, (reason, ids) in enumerate(by_reason.items()):
        if k == MAX_LEGEND_REASONS:
            rest = sum(len(v) for v in list(by_reason.values())[k:])
            out.append((None, [f"… {len(by_reason) - k} more reasons, {rest} groups (ptgraph analyze lists them)"]))
            break
        listed = ", ".join(f"g{i}" for i in ids[:12]) + (f" +{len(ids) - 12}" if len(ids) > 12 else "")
        out.append((style[ids[0]], textwrap.wrap(f"frozen: {reason}: {listed}", wrap, subsequent_indent="   ")))
    if any(g.prunable and not g.exact for g in gs):
        out.append(({"color": UNTYPED, "hatch": None, "dashed": True},
                     ["dashed border: inexact group (pruning changes normalisation statistics)"]))
    out.append(({"color": UNTYPED, "hatch": None, "dashed": False},
                 ["white: no tracked channel axis (its size never changes)"]))
    if analysis.graph.leaves or analysis.graph.ignored:
        out.append(({"color": UNTYPED, "hatch": None, "dashed": False, "edge": "#b00000"},
                     ["red border: a module kept whole (untraceable, or ignored by the user)"]))
    return out
