"""service/compiled_backend.py: backend=torch-compile answers as eager torch does; every shape a
runner feeds its model is compiled at load, so no request ever waits for a compilation; a model that
does not compile (no C++ compiler) or a task that cannot be compiled is served eagerly, saying why.

Run on the tiny models of the shared fixtures: a GPT-2 classifier (its tokenizer adds no special
tokens, so one-token inputs come) and a ResNet (CPU sub-batches of 1 to 4 images)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from service.folders import inspect_folder
from service.loading import load_runner
from service.tasks.classifier import ClassificationParameters
from tests.scores import assert_scores_close
from tests.service.service_helpers import Settings, make_models_dir

# Each list is one request's inputs; each runs as its own micro-batch, as the batcher would hand it.
TEXT_REQUESTS = [["x"], ["A gorgeous, witty, seductive movie."],
                 ["The plot is thin and the acting is wooden.", "meh", "x", "a", "Not bad at all, honestly."]]
IMAGE_BATCH_SIZES = [1, 3, 6, 2]  # 6: sub-batches of 4 and 2 on a CPU


def settings(tmp_path, backend: str) -> Settings:
    return Settings(_env_file=None, models_dir=tmp_path, backend=backend)


def load(folder, s: Settings):
    return load_runner(folder, inspect_folder(folder), s)


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 90 - 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def answer(runner, request) -> list:
    """The runner's result for one micro-batch: one request of texts, or one request per image."""
    params = ClassificationParameters(top_k=None)
    if isinstance(request[0], str):
        return runner.run_batch([runner.prepare((request, params))[0]], [params])[0]
    prepared = [runner.prepare((image, params))[0] for image in request]
    return runner.run_batch(prepared, [params] * len(prepared))


@pytest.mark.parametrize("name", ["gpt2-cls", "resnet"])
def test_compiled_model_answers_as_eager_and_never_compiles_at_request_time(name, pristine_models, tmp_path):
    folder = make_models_dir(pristine_models, tmp_path, [name]) / name
    eager, compiled = load(folder, settings(tmp_path, "torch")), load(folder, settings(tmp_path, "torch-compile"))
    assert compiled.backend.name == "torch-compile", compiled.backend.note
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.backend.max_error < 1e-3
    if name == "resnet":  # one static graph per CPU sub-batch size
        assert "static shapes" in compiled.backend.note and all(f"{n}x3x64x64" in compiled.backend.note for n in range(1, 5))
        requests = [images(n, seed) for seed, n in enumerate(IMAGE_BATCH_SIZES)]
    else:  # one dynamic graph and its size-1 specialisations: one input, one token
        assert "dynamic shapes" in compiled.backend.note and "1x1" in compiled.backend.note
        requests = TEXT_REQUESTS
    graphs = counters["stats"]["unique_graphs"]
    for request in requests:
        assert_scores_close(answer(compiled, request), answer(eager, request))
    assert counters["stats"]["unique_graphs"] == graphs, "a request compiled a new graph"


def test_a_model_that_does_not_compile_is_served_eagerly_with_the_reason(pristine_models, tmp_path, caplog):
    folder = make_models_dir(pristine_models, tmp_path, ["resnet"]) / "resnet"
    torch._dynamo.reset()  # nothing compiled by another test may stand in for this compilation
    # A machine without a C++ compiler (a slim image): inductor cannot build its CPU kernels.
    with (torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++")), "fx_graph_cache": False}),
          caplog.at_level(logging.WARNING, logger="service.backends")):
        runner = load(folder, settings(tmp_path, "torch-compile"))
    assert "resnet: served by torch, not torch.compile: torch.compile failed" in caplog.text
    assert runner.backend.name == "torch"
    assert runner.backend.note.startswith("torch.compile failed:"), runner.backend.note
    assert not isinstance(runner.model, torch._dynamo.eval_frame.OptimizedModule)
    eager = load(folder, settings(tmp_path, "torch"))
    request = images(3, seed=0)
    assert_scores_close(answer(runner, request), answer(eager, request))


def test_text_generation_stays_eager(pristine_models, tmp_path):
    folder = make_models_dir(pristine_models, tmp_path, ["writer"]) / "writer"
    runner = load(folder, settings(tmp_path, "torch-compile"))
    assert runner.backend.name == "torch" and "runs eagerly" in runner.backend.note
