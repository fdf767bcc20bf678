"""Show a topology: an ASCII table, Graphviz DOT, or a PNG/SVG/PDF image.

``to_ascii`` and ``to_dot`` work on any topology, valid or not, so they can
help to find what is wrong; ``to_image`` needs a valid one (it lays the
hierarchy out by depth, cutting cycles of groups where they start) and
matplotlib.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from zmqfed.errors import ConfigError
from zmqfed.topo.graph import Node, Topology

__all__ = ["layers", "role_of", "to_ascii", "to_dot", "to_image"]

logger = logging.getLogger(__name__)

_COLOURS = {
    "aggregator": "#f6b26b",
    "both": "#ffd966",
    "collaborator": "#9fc5e8",
    "isolated": "#d9d9d9",
}
_IMAGE_FORMATS = (".png", ".svg", ".pdf")


def role_of(topology: Topology, node: Node) -> str:
    """``'aggregator'``, ``'collaborator'``, ``'both'`` or ``'isolated'``."""
    aggregates = bool(topology.collaborators_of(node))
    collaborates = bool(topology.aggregators_of(node))
    if aggregates and collaborates:
        return "both"
    if aggregates:
        return "aggregator"
    return "collaborator" if collaborates else "isolated"


def to_ascii(topology: Topology) -> str:
    """The adjacency table followed by one line per node: role, address, aggregators.

    Parameters
    ----------
    topology:
        Any topology (it is not validated).

    Returns
    -------
    str
        Plain text; ``^`` in the table marks an edge from the row's node up
        to the column's aggregator.
    """
    rows = [("node", "role", "address", "reports to")]
    for node in topology.nodes:
        aggs = ", ".join(a.nick_name for a in topology.aggregators_of(node)) or "-"
        rows.append((node.nick_name, role_of(topology, node), node.address.endpoint or "-", aggs))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    ]
    return topology.adjacency_table() + "\n\n" + "\n".join(line.rstrip() for line in lines)


def _dot_escape(text: str) -> str:
    """``text`` escaped for a quoted DOT string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_id(text: str) -> str:
    """A quoted DOT identifier."""
    return '"' + _dot_escape(text) + '"'


def to_dot(topology: Topology, name: str = "topology") -> str:
    """Graphviz DOT source: aggregators as boxes on top, edges collaborator -> aggregator.

    Parameters
    ----------
    topology:
        Any topology (it is not validated).
    name:
        The graph's name.

    Returns
    -------
    str
        Render it with ``dot -Tpng``.
    """
    lines = [
        f"digraph {_dot_id(name)} {{",
        "  rankdir=BT;",
        '  node [fontname="Helvetica", style=filled];',
    ]
    for node in topology.nodes:
        role = role_of(topology, node)
        label = _dot_escape(node.nick_name)
        if node.address.endpoint is not None:
            label += "\\n" + _dot_escape(node.address.endpoint)  # DOT's line break
        shape = "box" if role in ("aggregator", "both") else "ellipse"
        lines.append(
            f'  {_dot_id(node.nick_name)} [label="{label}", shape={shape}, '
            f'fillcolor="{_COLOURS[role]}"];'
        )
    for edge in topology.edges:
        lines.append(f"  {_dot_id(edge.start.nick_name)} -> {_dot_id(edge.end.nick_name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def layers(topology: Topology) -> list[list[Node]]:
    """Nodes by depth: roots (no out-edges) first, each node below all its aggregators.

    Within a layer, nodes are ordered by the mean position of their
    aggregators (ties keep topology order), which keeps subtrees together.
    A cycle of groups has no such layering: it is cut at the first of its
    nodes in topology order, which goes one layer below the aggregators
    already placed (its other out-edges then point down). The topology is
    validated first.
    """
    topology.validate()
    depth: dict[str, int] = {}
    waiting = {n.nick_name: len(topology.aggregators_of(n)) for n in topology.nodes}
    ready = [n for n in topology.nodes if waiting[n.nick_name] == 0]
    for n in ready:
        depth[n.nick_name] = 0
    while len(depth) < len(waiting):
        while ready:  # Kahn's algorithm, from the roots down
            node = ready.pop()
            for collab in topology.collaborators_of(node):
                name = collab.nick_name
                if name in depth and waiting[name] <= 0:
                    continue  # placed already: this edge closes a cycle
                depth[name] = max(depth.get(name, 0), depth[node.nick_name] + 1)
                waiting[name] -= 1
                if waiting[name] == 0:
                    ready.append(collab)
        stuck = [n for n in topology.nodes if waiting[n.nick_name] > 0]
        if not stuck:
            break
        cut = stuck[0]  # on or below a cycle: place it and go on from there
        depth.setdefault(cut.nick_name, 0)
        waiting[cut.nick_name] = 0
        ready.append(cut)
    result: list[list[Node]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for node in topology.nodes:
        result[depth[node.nick_name]].append(node)
    index: dict[str, int] = {}
    for layer in result:

        def centre(n: Node) -> float:
            parents = [
                index[a.nick_name] for a in topology.aggregators_of(n) if a.nick_name in index
            ]
            return sum(parents) / len(parents) if parents else -1.0

        layer.sort(key=centre)
        index.update((n.nick_name, i) for i, n in enumerate(layer))
    return result


def _positions(topology: Topology, rows: list[list[Node]]) -> dict[str, tuple[float, float]]:
    """x (min spacing 1, parents centred over children) and y (-depth) per node."""
    pos: dict[str, tuple[float, float]] = {}
    for depth in range(len(rows) - 1, -1, -1):
        last = -math.inf
        for node in rows[depth]:
            kids = [  # collaborators drawn below; a cycle's way back up does not count
                pos[c.nick_name][0] for c in topology.collaborators_of(node) if c.nick_name in pos
            ]
            if kids:
                want = sum(kids) / len(kids)
            else:
                want = 0.0 if last == -math.inf else last + 1
            x = max(want, last + 1)
            pos[node.nick_name] = (x, -float(depth))
            last = x
    return pos


def _clip(
    a: tuple[float, float], b: tuple[float, float], half: tuple[float, float], box: bool
) -> tuple[float, float]:
    """The point where segment a->b leaves the node shape centred at ``a``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    if box:
        t = min(half[0] / abs(ux) if ux else math.inf, half[1] / abs(uy) if uy else math.inf)
    else:
        t = 1.0 / math.sqrt((ux / half[0]) ** 2 + (uy / half[1]) ** 2)
    return (a[0] + ux * t, a[1] + uy * t)


def _short(text: str, limit: int) -> str:
    """``text`` cut in the middle to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep - keep // 2] + "\u2026" + text[len(text) - keep // 2 :]


def to_image(
    topology: Topology, path: str | os.PathLike[str], *, dpi: int = 120, title: str | None = None
) -> Path:
    """Draw the hierarchy top-down (roots on top) as PNG, SVG or PDF by suffix.

    Aggregators are drawn as boxes (roots orange, edge aggregators yellow),
    collaborators as blue ellipses; arrows point from collaborator to
    aggregator.

    Parameters
    ----------
    topology:
        A valid topology.
    path:
        Output file; ``.png``, ``.svg`` or ``.pdf``.
    dpi:
        Resolution of a PNG.
    title:
        Optional title above the drawing.

    Returns
    -------
    Path
        The written file.
    """
    target = Path(path)
    if target.suffix.lower() not in _IMAGE_FORMATS:
        raise ConfigError(f"{os.fspath(path)}: image must end in one of {_IMAGE_FORMATS}")
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Ellipse, FancyBboxPatch, Patch
    except ImportError as exc:
        raise ImportError(
            "to_image needs matplotlib: pip install matplotlib (or use to_dot)"
        ) from exc
    rows = layers(topology)
    pos = _positions(topology, rows)
    xs = [p[0] for p in pos.values()] or [0.0]
    # taller layers for wide ones, so long edges do not cut through neighbouring nodes
    slope = max(
        (abs(pos[e.start.nick_name][0] - pos[e.end.nick_name][0]) for e in topology.edges),
        default=0.0,
    )
    gap = min(6.0, max(1.2, 0.3 * slope))
    pos = {name: (x, y * gap) for name, (x, y) in pos.items()}
    width, height = max(xs) - min(xs) + 1.2, (len(rows) - 1) * gap + 0.8
    scale = min(1.4, 40.0 / width, 40.0 / height)  # inches per unit; caps huge drawings
    fig = Figure(figsize=(max(1.0, width * scale), max(1.0, height * scale)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(-(len(rows) - 1) * gap - 0.4, 0.4)
    font = max(3.0, 9.0 * scale / 1.4)
    roles = _draw(ax, topology, pos, font, Ellipse, FancyBboxPatch)
    handles = [
        Patch(facecolor=_COLOURS[r], edgecolor="#333333", label=r) for r in _COLOURS if r in roles
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(handles),
        fontsize=max(3.0, font * 0.8),
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=font * 1.2)
    fig.savefig(target, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    logger.debug("drew topology of %d nodes to %s", len(pos), target)
    return target


def _draw(
    ax: Any,
    topology: Topology,
    pos: dict[str, tuple[float, float]],
    font: float,
    ellipse: Any,
    rectangle: Any,
) -> set[str]:
    """Draw edges, then nodes on top of them; return the roles drawn."""
    half = (0.42, 0.2)
    roles = {n.nick_name: role_of(topology, n) for n in topology.nodes}
    boxed = {name: role in ("aggregator", "both") for name, role in roles.items()}
    for edge in topology.edges:
        a, b = pos[edge.start.nick_name], pos[edge.end.nick_name]
        ax.annotate(
            "",
            xy=_clip(b, a, half, boxed[edge.end.nick_name]),
            xytext=_clip(a, b, half, boxed[edge.start.nick_name]),
            arrowprops={"arrowstyle": "-|>", "color": "#444444", "shrinkA": 0, "shrinkB": 0},
        )
    for node in topology.nodes:
        name = node.nick_name
        x, y = pos[name]
        style: dict[str, Any] = {
            "facecolor": _COLOURS[roles[name]],
            "edgecolor": "#333333",
            "zorder": 2,
        }
        if boxed[name]:
            corner = (x - half[0], y - half[1])
            ax.add_patch(
                rectangle(corner, 2 * half[0], 2 * half[1], boxstyle="square,pad=0", **style)
            )
        else:
            ax.add_patch(ellipse((x, y), 2 * half[0], 2 * half[1], **style))
        endpoint = node.address.endpoint if boxed[name] else None
        shift = 0.06 if endpoint else 0.0
        ax.text(x, y + shift, _short(name, 14), ha="center", va="center", fontsize=font, zorder=3)
        if endpoint:
            ax.text(
                x,
                y - 0.09,
                _short(endpoint, 22),
                ha="center",
                va="center",
                fontsize=font * 0.7,
                zorder=3,
            )
    return set(roles.values())
