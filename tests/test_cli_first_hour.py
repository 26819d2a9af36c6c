"""What a new user meets in the first hour (issue 15), each point through the CLI as they would type it."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from graphprune.cli import main
from graphprune.examples import example_cnn
from graphprune.io import write_model_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("first") / "example.onnx")
    write_model_atomic(example_cnn(image=16), path)
    return path


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Nested(torch.nn.Module):
    """Layer names like /layer3/layer3.1/conv1/Conv: long, and alike except in the middle."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        for i in range(1, 5):
            setattr(self, f"layer{i}", torch.nn.Sequential(Block(8), Block(8)))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """A static batch-1 export (torch.onnx.export's default), as a user's own model would be."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("nested") / "nested.onnx")
    torch.onnx.export(Nested().eval(), (torch.randn(1, 3, 16, 16),), path, dynamo=False, opset_version=17)
    return path


def run(*args, env=None):
    return CliRunner(env=env).invoke(main, list(args))


def test_python_dash_m_graphprune():
    proc = subprocess.run([sys.executable, "-m", "graphprune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: graphprune" in proc.stdout and "prune" in proc.stdout and "inspect" in proc.stdout


def test_written_files_and_dry_runs_are_said(example, tmp_path):
    out, page = tmp_path / "slim.onnx", tmp_path / "report.html"
    res = run(example, "--target-flops", "0.5", "-o", str(out), "--report", str(page))
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout and f"wrote {page}" in res.stdout
    res = run(example, "--target-flops", "0.5", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "dry run: nothing written" in res.stderr and "wrote" not in res.output
    res = run(example, "--target-flops", "0.5", "--dry-run", "--json")
    assert json.loads(res.stdout)["achieved"] <= 0.5  # stdout stays pure JSON
    assert "dry run: nothing written" in res.stderr


def test_ignored_groups_say_so_and_why(nested):
    # --round-to 1: these 8-channel groups would otherwise move in steps of 4-8 and leave too little to prune
    res = run(nested, "--target-flops", "0.5", "--dry-run", "--json", "--ignore", "/layer4/*", "--ignore", "/nope/*",
              "--round-to", "1")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    ignored = [g for g in report["groups"] if g["state"] == "ignored"]
    assert ignored and all(g["ignored"] and not g["frozen"] and g["kept"] == g["channels"] for g in ignored)
    assert all(g["reason"] for g in ignored)
    reasons = " ".join(g["reason"] for g in ignored)
    assert "written by ignored layer /layer4/" in reasons
    # the residual stream is produced in layer1..3 but feeds layer4: kept whole, and the reason says so
    assert "kept whole: feeds ignored layer /layer4/" in reasons
    # a pattern that matches nothing is a warning, in the report and on stderr
    assert report["warnings"] == ["--ignore '/nope/*' matches no layer or parameter name"]
    assert "graphprune: warning: --ignore '/nope/*' matches no layer or parameter name" in res.stderr
    table = run(nested, "--target-flops", "0.5", "--dry-run", "--ignore", "/layer4/*", "--all", "--round-to", "1",
                env={"COLUMNS": "200"})
    assert "ignored: written by ignored layer" in table.stdout


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), res.stderr
    return lines[0]


def test_errors_name_the_flags(example):
    msg = one_line_error(run(example, "--target-flops", "0.5", "--target-params", "0.5", "--dry-run"))
    assert "--target-flops" in msg and "--target-params" in msg and "target_flops" not in msg
    msg = one_line_error(run(example, "--target-flops", "1.5", "--dry-run"))
    assert "--target-flops" in msg and "(0, 1]" in msg


def test_method_lists_match_the_model_kind(example):
    msg = one_line_error(run(example, "--target-flops", "0.5", "--dry-run", "--method", "nope"))
    assert "'di'" in msg and "'fpgm'" in msg and "taylor" not in msg  # taylor needs an nn.Module
    msg = one_line_error(run(example, "--target-flops", "0.5", "--dry-run", "--method", "hfp"))
    assert "graphprune.passes.hfp" in msg
    help_text = " ".join(run("prune", "--help").stdout.split())
    method_help = help_text[help_text.index("--method"):help_text.index("--strategy")]
    assert "di" in method_help and "--calib" in method_help and "..." not in method_help


def test_tables_fit_80_columns_and_end_with_the_summary(nested):
    res = run(nested, "--target-flops", "0.5", "--dry-run", env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.rstrip().splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    # the summary, the target line and the measured speed-up come last, after the group table (the
    # dry-run line is on stderr)
    tail = "\n".join(lines[-5:])
    assert "target macs" in tail and "speed-up" in tail and "FLOPs reduction" in lines[-1]
    assert "dry run" in res.stderr
    assert res.stdout.index("channel groups") < res.stdout.index("graphprune result")
    # names are told apart by their shortest unique ending, not cut to a shared prefix
    assert "layer3.1/conv1/Conv" in res.stdout and "/layer3/layer3.1/co…" not in res.stdout
    rows = lambda out: [l for l in out.splitlines() if re.match(r"^\S*\s*│\s*\d+\s*│", l)]  # noqa: E731
    few = run(nested, "--target-flops", "0.5", "--dry-run", "--groups", "3", env={"COLUMNS": "80"})
    every = run(nested, "--target-flops", "0.5", "--dry-run", "--all", env={"COLUMNS": "200"})
    assert len(rows(few.stdout)) == 3
    assert re.search(r"\d+ more groups \(--groups N or --all", few.stdout)
    report = json.loads(run(nested, "--target-flops", "0.5", "--dry-run", "--json").stdout)
    assert len(rows(every.stdout)) == len(report["groups"]) and "more groups" not in every.stdout


def test_di_on_a_static_batch_model_never_tracebacks(nested, tmp_path):
    """The default export has a fixed batch of 1; calibration data is a batch of many: DI feeds it
    one sample at a time and prunes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x, y=(x[:, 0].mean((1, 2)) > 0).astype(np.int64))
    res = run(nested, "--target-flops", "0.6", "--dry-run", "--method", "di", "--calib", str(calib))
    assert "Traceback" not in res.output
    assert res.exit_code == 0, res.output
    assert json.loads(run(nested, "--target-flops", "0.6", "--dry-run", "--method", "di", "--calib", str(calib),
                          "--json").stdout)["achieved"] <= 0.6 + 1e-9


def test_readme_says_what_the_tests_need():
    readme = open(os.path.join(ROOT, "README.md")).read()
    setup = readme[readme.index("## Set-up"):readme.index("## Usage")]
    assert "graphviz" in setup and "chromium" in setup  # the tools the default run needs, or it skips
    assert "-m slow" in setup  # how to run the slow zoo tests the default run leaves out
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    torch_extra = re.search(r"^torch = \[(.*)\]$", pyproject, re.M).group(1)
    assert "onnxscript" in torch_extra  # torch.onnx.export's default (dynamo) exporter needs it
    assert "dynamo=False" in readme
