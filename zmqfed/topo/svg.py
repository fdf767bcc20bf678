"""Draw a topology as SVG text, without matplotlib, with nodes coloured by state.

The drawing is :func:`zmqfed.topo.render.to_image`'s: the same layers and
positions, aggregators as boxes above their collaborators' ellipses, arrows
from collaborator to aggregator, the same role colours.  Every node is a
``<g class="node" data-node=NAME data-role=ROLE data-state=STATE>``, so a
page can recolour it (the live dashboard, ``docs/operations.md``): a state of
``online`` or ``offline`` fills the node green or red, through the style
sheet the SVG carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from zmqfed.topo.graph import Topology
from zmqfed.topo.render import _COLOURS, _clip, _positions, _short, layers, role_of

__all__ = ["STATE_COLOURS", "to_svg"]

#: Fill of a node by state; other states keep the node's role colour.
STATE_COLOURS = {"online": "#93c47d", "offline": "#e06666"}

_UNIT = 110.0  # pixels per layout unit
_HALF = (0.42, 0.2)  # half width and height of a node, in layout units (as to_image)


def _style() -> str:
    rules = [
        ".node .shape { stroke: #333333; stroke-width: 1; }",
        ".node text { font: 12px sans-serif; text-anchor: middle; dominant-baseline: middle; }",
        ".node text.endpoint { font-size: 9px; fill: #333333; }",
        ".edge { stroke: #444444; stroke-width: 1.2; fill: none; }",
        '.node[data-state="unknown"] { opacity: 0.55; }',
    ]
    rules += [f'.node[data-state="{s}"] .shape {{ fill: {c}; }}' for s, c in STATE_COLOURS.items()]
    return "\n".join(rules)


def to_svg(
    topology: Topology, states: Mapping[str, str] | None = None, *, title: str | None = None
) -> str:
    """The topology as an SVG document (a string).

    Parameters
    ----------
    topology:
        A valid topology.
    states:
        ``{node name: state}``; ``online`` and ``offline`` colour the node,
        any other value (``self``, ``unknown``) is only recorded in its
        ``data-state``.  Nodes not named get ``unknown``.
    title:
        Optional ``<title>`` of the drawing.

    Returns
    -------
    str
        ``<svg ...>...</svg>``, sized to the drawing.
    """
    states = states or {}
    rows = layers(topology)
    pos = _positions(topology, rows)
    slope = max(
        (abs(pos[e.start.nick_name][0] - pos[e.end.nick_name][0]) for e in topology.edges),
        default=0.0,
    )
    gap = min(6.0, max(1.2, 0.3 * slope))
    pos = {name: (x, y * gap) for name, (x, y) in pos.items()}
    xs = [p[0] for p in pos.values()] or [0.0]
    left, top = min(xs) - 0.6, 0.4

    def px(point: tuple[float, float]) -> tuple[float, float]:
        return ((point[0] - left) * _UNIT, (top - point[1]) * _UNIT)

    width = (max(xs) - min(xs) + 1.2) * _UNIT
    height = ((len(rows) - 1) * gap + 0.8) * _UNIT
    roles = {n.nick_name: role_of(topology, n) for n in topology.nodes}
    boxed = {name: role in ("aggregator", "both") for name, role in roles.items()}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="topology" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">',
        f"<style>\n{_style()}\n</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#444444"/></marker></defs>',
    ]
    if title:
        out.append(f"<title>{escape(title)}</title>")
    for edge in topology.edges:
        a, b = pos[edge.start.nick_name], pos[edge.end.nick_name]
        x1, y1 = px(_clip(a, b, _HALF, boxed[edge.start.nick_name]))
        x2, y2 = px(_clip(b, a, _HALF, boxed[edge.end.nick_name]))
        out.append(
            f'<line class="edge" data-from="{escape(edge.start.nick_name)}" '
            f'data-to="{escape(edge.end.nick_name)}" x1="{x1:.1f}" y1="{y1:.1f}" '
            f'x2="{x2:.1f}" y2="{y2:.1f}" marker-end="url(#arrow)"/>'
        )
    w, h = 2 * _HALF[0] * _UNIT, 2 * _HALF[1] * _UNIT
    for node in topology.nodes:
        name = node.nick_name
        cx, cy = px(pos[name])
        state = states.get(name, "unknown")
        fill = _COLOURS[roles[name]]
        out.append(
            f'<g class="node" data-node="{escape(name)}" data-role="{roles[name]}" '
            f'data-state="{escape(state)}"><title>{escape(name)} ({roles[name]})</title>'
        )
        if boxed[name]:
            out.append(
                f'<rect class="shape" x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" '
                f'width="{w:.1f}" height="{h:.1f}" fill="{fill}"/>'
            )
        else:
            out.append(
                f'<ellipse class="shape" cx="{cx:.1f}" cy="{cy:.1f}" rx="{w / 2:.1f}" '
                f'ry="{h / 2:.1f}" fill="{fill}"/>'
            )
        endpoint = node.address.endpoint if boxed[name] else None
        label_y = cy - 6 if endpoint else cy
        out.append(f'<text x="{cx:.1f}" y="{label_y:.1f}">{escape(_short(name, 14))}</text>')
        if endpoint:
            out.append(
                f'<text class="endpoint" x="{cx:.1f}" y="{cy + 9:.1f}">'
                f"{escape(_short(endpoint, 22))}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
