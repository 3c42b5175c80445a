"""The merged task graph as a picture: :class:`GraphPicture` (input fields, modules, tasks and
the edges between them) rendered as SVG, Mermaid or Graphviz DOT.

A module node stands for the merged module of that name: a module several tasks read is drawn
once, filled and labelled with the tasks that share it. The SVG needs no layout engine: nodes sit
in columns by their depth (longest path from an input).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.task import Task

INPUT = "_input_"
FORMATS = {".svg": "svg", ".mmd": "mermaid", ".mermaid": "mermaid", ".dot": "dot", ".gv": "dot"}
"""File extensions :func:`write_graph` understands, and the format each writes."""

_XMLNS = ' xmlns="http://www.w3.org/2000/svg"'
_SHARED_FILL, _OWN_FILL, _INPUT_FILL, _TASK_FILL = "#f6c177", "#dfe7f2", "#e8f3e0", "#ffffff"


@dataclass
class GraphPicture:
    """Nodes and edges of a model's merged graph.

    Attributes:
        nodes: ``id -> (kind, label)``; kind is ``"input"``, ``"module"`` or ``"task"``.
        users: Module id -> the tasks that read it (several: shared).
        edges: ``(source id, target id, detached)``, each once.

    Example:
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> from mtlgraph.graph.drawing import GraphPicture
        >>> tasks = [Task(t, {"trunk": nn.Linear(2, 2), f"{t}_head": nn.Linear(2, 2)},
        ...               [Operation("trunk", [("_input_", "x")]),
        ...                Operation(f"{t}_head", ["trunk"])]) for t in ("a", "b")]
        >>> picture = GraphPicture.of(tasks)
        >>> picture.users["mod_trunk"]
        ['a', 'b']
        >>> print(picture.to_mermaid().splitlines()[2])
            mod_trunk["trunk<br/>shared: a, b"]
    """

    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    users: dict[str, list[str]] = field(default_factory=dict)
    edges: list[tuple[str, str, bool]] = field(default_factory=list)

    @classmethod
    def of(cls, tasks: Iterable[Task]) -> GraphPicture:
        """The picture of ``tasks`` merged by module name (``model.tasks.values()``)."""
        pic = cls()
        for task in tasks:
            module_of = {op.name: op.module_name for op in task.op_sequence}
            for op in task.op_sequence:
                sources = [pic._source(inp.source, inp.key, module_of) for inp in op.inputs]
                node = pic._module(op.module_name, task.name)
                for src, inp in zip(sources, op.inputs, strict=True):
                    pic._edge(src, node, bool(inp.detach))
            tnode = f"task_{task.name}"
            pic.nodes[tnode] = ("task", task.name)
            pic._edge(f"mod_{module_of[task.output_op]}", tnode, False)
        return pic

    def _source(self, source: str, key: Any, module_of: Mapping[str, str]) -> str:
        """The node an input comes from: an input field, or the module of an earlier op."""
        if source != INPUT:
            return self._module(module_of[source], None)
        node = f"in_{key}" if key is not None else "in__all"
        self.nodes.setdefault(node, ("input", str(key) if key is not None else INPUT))
        return node

    def _module(self, name: str, task: str | None) -> str:
        node = f"mod_{name}"
        self.nodes.setdefault(node, ("module", name))
        users = self.users.setdefault(node, [])
        if task is not None and task not in users:
            users.append(task)
        return node

    def _edge(self, src: str, dst: str, detached: bool) -> None:
        if (src, dst, detached) not in self.edges:
            self.edges.append((src, dst, detached))

    def shared(self, node: str) -> bool:
        """Whether several tasks read module ``node``."""
        return len(self.users.get(node, [])) > 1

    def _label(self, node: str) -> tuple[str, str]:
        kind, label = self.nodes[node]
        if kind != "module":
            return label, ""
        users = self.users[node]
        return label, ("shared: " if len(users) > 1 else "") + ", ".join(users)

    # ------------------------------------------------------------------ renderers

    def to_dot(self) -> str:
        """Graphviz DOT (``dot -Tsvg``)."""
        lines = ["digraph mtlgraph {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
        for node, (kind, _) in self.nodes.items():
            name, sub = self._label(node)
            label = f"{name}\\n{sub}" if sub else name
            shape = {"input": "parallelogram", "module": "box", "task": "ellipse"}[kind]
            fill = self._fill(node)
            lines.append(
                f'  "{node}" [label="{label}", shape={shape}, style=filled, fillcolor="{fill}"];'
            )
        for src, dst, detached in self.edges:
            style = ' [style=dashed, label="detach"]' if detached else ""
            lines.append(f'  "{src}" -> "{dst}"{style};')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """A Mermaid flowchart (renders on GitHub and in many Markdown viewers)."""
        lines = ["flowchart LR"]
        shape = {"input": ('[/"', '"/]'), "module": ('["', '"]'), "task": ('(["', '"])')}
        for node, (kind, _) in self.nodes.items():
            name, sub = self._label(node)
            text = f"{name}<br/>{sub}" if sub else name
            left, right = shape[kind]
            lines.append(f"    {node}{left}{text}{right}")
        for src, dst, detached in self.edges:
            lines.append(f"    {src} {'-. detach .->' if detached else '-->'} {dst}")
        lines += [f"    style {n} fill:{_SHARED_FILL}" for n in self.nodes if self.shared(n)]
        return "\n".join(lines) + "\n"

    def to_svg(self, standalone: bool = True) -> str:
        """SVG: a column per depth, shared modules filled orange; ``standalone=False`` leaves
        out the XML namespace (an ``<svg>`` inline in HTML needs none)."""
        depth = self._depths()
        columns: dict[int, list[str]] = {}
        for node in self.nodes:
            columns.setdefault(depth[node], []).append(node)
        w, h, gap_x, gap_y, margin = 170, 44, 60, 22, 40
        pos: dict[str, tuple[float, float]] = {}
        tallest = max(len(c) for c in columns.values()) if columns else 1
        inner = tallest * (h + gap_y) + gap_y
        height = inner + 2 * margin  # room for edges that skip a column, routed around
        for col, nodes in sorted(columns.items()):
            top = margin + (inner - len(nodes) * (h + gap_y) + gap_y) / 2
            for i, node in enumerate(nodes):
                pos[node] = (gap_x / 2 + col * (w + gap_x), top + i * (h + gap_y))
        width = len(columns) * (w + gap_x)
        parts = [
            f'<svg{_XMLNS if standalone else ""} width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica,Arial,sans-serif" '
            'font-size="12">',
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
            "</defs>",
        ]
        skips = 0
        for src, dst, detached in self.edges:
            (x1, y1), (x2, y2) = pos[src], pos[dst]
            sx, sy, tx, ty = x1 + w, y1 + h / 2, x2, y2 + h / 2
            dash = ' stroke-dasharray="5,4"' if detached else ""
            if depth[dst] - depth[src] > 1:  # over (or, every other one, under) the columns
                cy = -margin / 2 if skips % 2 == 0 else height + margin / 2
                skips += 1
                d = f"M{sx:.0f},{sy:.0f} C{sx + gap_x:.0f},{cy:.0f} {tx - gap_x:.0f},{cy:.0f}"
                d += f" {tx:.0f},{ty:.0f}"
            else:
                d = f"M{sx:.0f},{sy:.0f} L{tx:.0f},{ty:.0f}"
            parts.append(
                f'<path d="{d}" fill="none" stroke="#555"{dash} marker-end="url(#arrow)"/>'
            )
        for node, (kind, _) in self.nodes.items():
            parts.append(self._svg_node(node, kind, *pos[node], w, h))
        parts.append("</svg>")
        return "\n".join(parts) + "\n"

    def _svg_node(self, node: str, kind: str, x: float, y: float, w: int, h: int) -> str:
        name, sub = (html.escape(s) for s in self._label(node))
        rx = h / 2 if kind == "task" else 4
        stroke = ' stroke-width="2.5"' if self.shared(node) else ""
        text = (
            f'<text x="{x + w / 2:.0f}" y="{y + (17 if sub else 26):.0f}" text-anchor="middle" '
            f'font-weight="bold">{name}</text>'
        )
        if sub:
            text += (
                f'<text x="{x + w / 2:.0f}" y="{y + 33:.0f}" text-anchor="middle" '
                f'font-size="10">{sub}</text>'
            )
        return (
            f'<g class="{kind}"><title>{name}</title><rect x="{x:.0f}" y="{y:.0f}" width="{w}" '
            f'height="{h}" rx="{rx:.0f}" fill="{self._fill(node)}" stroke="#333"{stroke}/>'
            f"{text}</g>"
        )

    def _fill(self, node: str) -> str:
        kind = self.nodes[node][0]
        if kind == "module":
            return _SHARED_FILL if self.shared(node) else _OWN_FILL
        return _INPUT_FILL if kind == "input" else _TASK_FILL

    def _depths(self) -> dict[str, int]:
        """Longest path from a source, per node (the graph is acyclic)."""
        depth = dict.fromkeys(self.nodes, 0)
        for _ in range(len(self.nodes)):
            changed = False
            for src, dst, _ in self.edges:
                if depth[dst] < depth[src] + 1:
                    depth[dst], changed = depth[src] + 1, True
            if not changed:
                break
        return depth

    def render(self, fmt: str) -> str:
        """The picture as ``"svg"``, ``"mermaid"`` or ``"dot"``."""
        renderers: Mapping[str, Any] = {
            "svg": self.to_svg,
            "mermaid": self.to_mermaid,
            "dot": self.to_dot,
        }
        return str(renderers[fmt]())


def graph_format(path: str | Path) -> str:
    """The format :func:`write_graph` uses for ``path``, from its extension.

    Raises:
        ConfigError: An extension not in :data:`FORMATS`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ConfigError(
            [f"--graph {path}: unknown picture format '{suffix}'; use one of {known}"]
        )
    return FORMATS[suffix]


def write_graph(tasks: Iterable[Task], path: str | Path) -> Path:
    """Write the merged graph of ``tasks`` to ``path`` as SVG, Mermaid or DOT (by extension)."""
    from mtlgraph._io import atomic_write_text

    fmt = graph_format(path)
    atomic_write_text(Path(path), GraphPicture.of(tasks).render(fmt))
    return Path(path)
