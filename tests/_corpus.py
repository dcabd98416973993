"""Fixtures shared by the corpus-run tests (test_dataset.py, test_concepts.py): the tiny Llama with a word-level
tokenizer, random "t3 t17 ..." texts, and one Ray session for the whole test run (Ray start-up costs seconds)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from _support import tiny_model

HERE = Path(__file__).parent


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    return [" ".join(f"t{i}" for i in rng.randint(3, 120, size=rng.randint(2, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """The tiny Llama with a word-level tokenizer over its vocabulary ("t0" .. "t127")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, path = tiny_model("llama")
    d = tmp_path_factory.mktemp("tinytext")
    (d / "model.onnx").symlink_to(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d / "model.onnx"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, started by :func:`onnx_lrp.scale.start`; its workers import the tests folder too
    (jobs defined in test modules)."""
    import ray

    from onnx_lrp.scale import start

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    start(num_cpus=2)  # as `onnx-lrp explain-dataset` starts it
    yield
    ray.shutdown()
