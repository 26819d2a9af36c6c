"""`graphprune inspect` JSON and DOT on torchvision resnet50 and densenet121, checked against groups
derived from the architecture itself (iterating the torchvision modules), not against snapshots."""
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from click.testing import CliRunner

import graphprune
from graphprune.cli import main
from graphprune.report.inspect import FROZEN_GREY, group_color
from zoo import export


def module_of(node_name: str) -> str:
    """ONNX node scope -> torch module path: '/layer1/layer1.0/downsample/downsample.0/Conv' -> 'layer1.0.downsample.0'."""
    comps: list[str] = []
    for seg in [s for s in node_name.split("/") if s][:-1]:
        if comps and seg.startswith(comps[-1] + "."):
            comps[-1] = seg
        else:
            comps.append(seg)
    return ".".join(comps)


# -- expected groups from the architecture: producer module -> (channels, member modules) ------------
def expected_resnet(m) -> dict[str, tuple[int, set[str]]]:
    groups = {"conv1": (m.conv1.out_channels, {"conv1"})}
    stream = ["conv1"]  # producers whose channels form the current residual stream
    for sname in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(m, sname)
        for bname, block in stage.named_children():
            p = f"{sname}.{bname}"
            convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
            readers = {f"{p}.conv1"} | ({f"{p}.downsample.0"} if block.downsample is not None else set())
            for prod in stream:
                groups[prod][1].update(readers)
            for a, b in zip(convs, convs[1:]):  # a block's internal groups: conv_k out -> conv_k+1 in
                groups[f"{p}.{a}"] = (getattr(block, a).out_channels, {f"{p}.{a}", f"{p}.{b}"})
            last = f"{p}.{convs[-1]}"
            if block.downsample is not None:
                stream = [f"{p}.downsample.0"]
                groups[stream[0]] = (block.downsample[0].out_channels, {stream[0]})
            # the residual Add couples the block output with the stream: one group per stage
            head = stream[0]
            groups[head][1].add(last)
        stream = [head]
    groups[stream[0]][1].add("fc")
    return groups


def expected_densenet(m) -> dict[str, tuple[int, set[str]]]:
    f = m.features
    groups = {"features.conv0": (f.conv0.out_channels, {"features.conv0"})}
    stream = ["features.conv0"]  # producers of the feature maps concatenated so far
    for name, child in f.named_children():
        if name.startswith("denseblock"):
            for lname, layer in child.named_children():
                p = f"features.{name}.{lname}"
                for prod in stream:
                    groups[prod][1].update({f"{p}.norm1", f"{p}.conv1"})
                groups[f"{p}.conv1"] = (layer.conv1.out_channels, {f"{p}.conv1", f"{p}.norm2", f"{p}.conv2"})
                groups[f"{p}.conv2"] = (layer.conv2.out_channels, {f"{p}.conv2"})
                stream.append(f"{p}.conv2")
        elif name.startswith("transition"):
            t = f"features.{name}"
            for prod in stream:
                groups[prod][1].update({f"{t}.norm", f"{t}.conv"})
            stream = [f"{t}.conv"]
            groups[stream[0]] = (child.conv.out_channels, {stream[0]})
        elif name == "norm5":
            for prod in stream:
                groups[prod][1].update({"features.norm5", "classifier"})
    return groups


EXPECTED = {"resnet50": expected_resnet, "densenet121": expected_densenet}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def case(request, zoo_dir, tmp_path_factory):
    name = request.param
    path = export(name, zoo_dir)
    out = tmp_path_factory.mktemp(f"inspect_{name}")
    dot = out / "graph.dot"
    svg = out / "graph.svg"
    res = CliRunner().invoke(main, ["inspect", path, "--json", "--dot", str(dot), "--svg", str(svg), "--no-graphviz"])
    assert res.exit_code == 0, res.output
    view = json.loads(res.output)
    model = getattr(torchvision.models, name)()
    return name, path, view, EXPECTED[name](model), dot.read_text(), svg.read_text()


def test_groups_match_architecture(case):
    name, _, view, expected, _, _ = case
    groups = view["groups"]
    present = {module_of(n["id"]) for n in view["graph"]["nodes"] if n["kind"] == "op"}
    # prunable groups: exactly one per channel producer set of the architecture, plus frozen input/output
    prunable = [g for g in groups if not g["frozen"]]
    assert len(prunable) == len(expected)
    frozen = sorted((g["reason"], g["channels"]) for g in groups if g["frozen"])
    assert frozen == [("model input", 3), ("model output", 1000)]
    assert view["summary"]["groups"] == len(expected) + 2
    by_head = {}
    for g in prunable:
        producers = sorted(module_of(p) for p in g["producers"])
        by_head[producers[0] if len(producers) == 1 else min(set(producers) & set(expected))] = g
    assert set(by_head) == set(expected)
    for head, (channels, members) in expected.items():
        g = by_head[head]
        assert g["channels"] == channels, head
        # members the export kept (BN after a conv is folded into it)
        assert {module_of(n) for n in g["layers"]} == members & present, head


def test_resnet_residual_groups(case):
    name, _, view, expected, _, _ = case
    if name != "resnet50":
        pytest.skip("resnet-specific")
    m = torchvision.models.resnet50()
    stages = [m.layer1, m.layer2, m.layer3, m.layer4]
    joined = [g for g in view["groups"] if g["joins"]]
    # one residual-stream group per stage, joined by that stage's Adds, written by its conv3s + downsample
    assert len(joined) == len(stages)
    for g, stage in zip(joined, stages):
        assert len(g["joins"]) == len(stage)
        assert len(g["producers"]) == len(stage) + 1
        assert g["channels"] == stage[0].conv3.out_channels
    internal = [g for g in view["groups"] if not g["frozen"] and not g["joins"] and len(g["layers"]) == 2]
    assert len(internal) == 2 * sum(len(s) for s in stages)  # 16 bottlenecks * (conv1 out, conv2 out)


def test_densenet_growth_groups(case):
    name, _, view, _, _, _ = case
    if name != "densenet121":
        pytest.skip("densenet-specific")
    m = torchvision.models.densenet121()
    layers = [l for b in m.features.children() if isinstance(b, torchvision.models.densenet._DenseBlock) for l in b.children()]
    growth = {g["producers"][0]: g for g in view["groups"] if len(g["producers"]) == 1 and g["producers"][0].endswith("conv2/Conv")}
    assert len(growth) == len(layers) == 58
    assert {g["channels"] for g in growth.values()} == {layers[0].conv2.out_channels}
    # concats lay groups side by side: the block output carries the input group plus one per layer
    block1_out = next(e for e in view["graph"]["edges"] if e["tensor"] == "/features/denseblock1/Concat_output_0")
    assert len(block1_out["groups"]) == 1 + len(m.features.denseblock1)
    assert block1_out["channels"] == m.features.transition1.conv.in_channels


def test_dot_colours_edges_by_group(case):
    name, _, view, _, dot, _ = case
    nodes = re.findall(r"^  (n\d+) \[", dot, re.M)
    edges = re.findall(r"^  (n\d+) -> (n\d+) \[(.*)\];$", dot, re.M)
    assert len(nodes) == len(view["graph"]["nodes"]) == view["summary"]["ops"] + 2  # + input, output
    assert len(edges) == len(view["graph"]["edges"])
    frozen = {g["id"] for g in view["groups"] if g["frozen"]}
    seen = set()
    for _, _, attrs in edges:
        cls = re.search(r'class="([^"]*)"', attrs).group(1).split()
        color = re.search(r'color="([^"]*)"', attrs).group(1)
        gids = [int(c[1:]) for c in cls if re.fullmatch(r"g\d+", c)]
        seen.update(gids)
        if gids and all(g in frozen for g in gids):
            assert color == FROZEN_GREY and 'style="dashed"' in attrs
            assert re.search(r"frozen: model (input|output)", attrs)
        elif gids:
            assert color.split(":")[0] == group_color(gids[0])
            assert re.search(rf'label="g{gids[0]}\b', attrs)
    # every group travels on at least one tensor between ops
    assert seen == {g["id"] for g in view["groups"]}


def test_graphviz_renders_the_dot(case):
    name, _, _, _, dot, _ = case
    if name != "resnet50":
        pytest.skip("one model is enough for Graphviz")
    if not shutil.which("dot"):
        pytest.skip("graphviz not installed (apt-get install graphviz)")
    proc = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"<svg" in proc.stdout


def test_builtin_svg_is_valid(case):
    _, _, view, _, _, svg = case
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    assert len(root.findall(f".//{ns}path")) >= len(view["graph"]["edges"])
    titles = [t.text for t in root.iter(f"{ns}title")]
    assert any(t and "frozen: model input" in t for t in titles)


def test_python_api_matches_cli(case):
    _, path, view, _, _, _ = case
    api_view = graphprune.inspect(path)
    assert [g["channels"] for g in api_view["groups"]] == [g["channels"] for g in view["groups"]]


def test_module_path():
    try:
        import graphprune.frontends.fx_frontend  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"PyTorch FX frontend not available yet: {exc}")
    m = torchvision.models.resnet18().eval()
    view = graphprune.inspect(m, (torch.randn(1, 3, 64, 64),))
    expected = expected_resnet(m)
    assert view["summary"]["prunable_groups"] == len(expected)
    assert sorted(g["channels"] for g in view["groups"] if not g["frozen"]) == sorted(c for c, _ in expected.values())
    assert view["graph"]["edges"]
