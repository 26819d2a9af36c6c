import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# every prune times original vs pruned; in tests the minimum (5 interleaved rounds) is enough
os.environ.setdefault("GRAPHPRUNE_MEASURE_S", "0")


@pytest.fixture(autouse=True)
def _same_random_state_in_any_order():
    """Each test starts from the same global RNG state, whichever tests ran before it on its worker.

    Many tests build torch models with default (random) initialisation or draw torch.randn without
    a generator; under pytest-xdist the tests a worker runs first differ from run to run, so those
    weights and inputs did too: a CI failure could not be reproduced by running the test alone.
    numpy and torch are only seeded when something already imported them.
    """
    random.seed(0)
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None:
        numpy.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """Exported ONNX models, shared by the tests of one session (GRAPHPRUNE_ZOO_DIR to reuse across runs)."""
    d = os.environ.get("GRAPHPRUNE_ZOO_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    return str(tmp_path_factory.mktemp("zoo"))


# CI runs a fixed set of hypothesis examples (reproducible, no flaky landings); the random search
# lives in benchmarks/fuzz_campaign.py and in HYPOTHESIS_PROFILE=explore runs
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    """Say before the run which tests will skip for a missing system tool, and how to install it."""
    import shutil

    missing = []
    if not shutil.which("dot"):
        missing.append("graphviz (`dot`: the inspect --svg test)")
    if not os.path.exists("/usr/bin/chromium"):  # the path tests/test_html_report.py drives
        missing.append("chromium (the HTML report browser test)")
    if not missing:
        return "system tools: graphviz and chromium found (no tool-related skips)"
    return [f"system tools missing, these tests will skip: {', '.join(missing)}",
            "  install: sudo apt-get install -y --no-install-recommends chromium chromium-driver graphviz"]
