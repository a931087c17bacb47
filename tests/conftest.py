import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

# The property tests (tests/strategies.py): the same examples on every run and machine (derandomized,
# no example database), no per-example deadline (a shared CI core is slow), and no health check on
# rejected or slow draws. A test's own settings give its number of examples; the slow campaign turns
# derandomize off for that test.
settings.register_profile("minillava", derandomize=True, database=None, deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.data_too_large])
settings.load_profile("minillava")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_model():
    return tiny.hf_model(seed=0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, hf_model, tokenizer_path):
    """The same tiny random model saved in every key layout: {layout: directory}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: tiny.save_checkpoint(hf_model, root / name, name, tokenizer_path) for name in tiny.LAYOUTS}


@pytest.fixture(scope="session")
def image_path(tmp_path_factory):
    """A 150 x 90 noise picture: a 2 x 1 crop grid on the tiny model's 56 px tiles."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(path)
    return path


PARITY: list[tuple[str, float]] = []  # (stage, max abs difference), filled by the parity tests
QUANT: list[tuple[str, float]] = []  # (what, value), filled by tests/test_quantize.py's slow tests


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity with transformers (max abs difference, float32)")
        for stage, diff in PARITY:
            terminalreporter.write_line(f"{stage:<60} {diff:.2e}")
    if QUANT:
        terminalreporter.section("weight-only int8 / int4 at LLaVA-1.6-7B's widths, random weights")
        for what, value in QUANT:
            terminalreporter.write_line(f"{what:<72} {value:.4g}")
