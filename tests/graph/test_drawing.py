"""The merged task graph as a picture: shared modules drawn once and marked, detached edges
dashed; ``mtlgraph check --graph`` writes SVG, Mermaid or DOT by extension."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from experiment_helpers import tiny_config, write_config
from torch import nn

from mtlgraph import Operation, Task
from mtlgraph.experiment.cli import main
from mtlgraph.graph.drawing import GraphPicture
from mtlgraph.graph.task import Input


def test_shared_module_is_one_node_and_detach_is_dashed() -> None:
    trunk = nn.Linear(2, 2)
    a = Task("a", {"trunk": trunk, "ha": nn.Linear(2, 2)},
             [Operation("trunk", [("_input_", "x")]), Operation("ha", ["trunk"])])  # fmt: skip
    b = Task(
        "b",
        {"trunk": trunk, "hb": nn.Linear(2, 2)},
        [Operation("trunk", [("_input_", "x")]), Operation("hb", [Input("trunk", detach=True)])],
    )
    pic = GraphPicture.of([a, b])
    assert pic.users == {"mod_trunk": ["a", "b"], "mod_ha": ["a"], "mod_hb": ["b"]}
    assert ("mod_trunk", "mod_hb", True) in pic.edges
    assert '"mod_trunk" -> "mod_hb" [style=dashed, label="detach"];' in pic.to_dot()
    svg = ET.fromstring(pic.to_svg())
    rects = svg.findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(rects) == len(pic.nodes) == 6  # x, trunk, ha, hb, a, b
    assert "shared: a, b" in pic.to_svg() and "mod_trunk" in pic.to_mermaid()


@pytest.mark.parametrize(("suffix", "marker"), [(".svg", "<svg"), (".mmd", "flowchart LR"),
                                                (".dot", "digraph mtlgraph")])  # fmt: skip
def test_check_writes_the_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str, marker: str
) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config())
    out = tmp_path / f"graph{suffix}"
    assert main(["check", str(config), "--graph", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert text.startswith(marker) and "shared: circle_task, square_task" in text
    assert f"graph written to {out}" in capsys.readouterr().out
