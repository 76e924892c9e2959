"""No image of any shape under the body limit takes the server down: every image-processor type we
serve, extreme sizes and aspect ratios, against a real server process whose peak memory is read."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.service.service_helpers import ServerProcess, peak_rss_mb, write_card
from tests.tiny_models import (
    build_tiny_convnext,
    build_tiny_efficientnet,
    build_tiny_mobilenet_v2,
    build_tiny_resnet,
    build_tiny_vit,
)

pytestmark = pytest.mark.slow
BUILDERS = {"mobilenet": build_tiny_mobilenet_v2, "resnet": build_tiny_resnet, "vit": build_tiny_vit,
            "convnext": build_tiny_convnext, "efficientnet": build_tiny_efficientnet}
# width x height: slivers, tiny, and big-but-allowed photos
SIZES = [(60_000, 1), (1, 60_000), (30_000, 2), (2, 30_000), (65_000, 3), (1, 1), (2, 2), (12_000, 40),
         (4000, 3000), (1, 4000)]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image-models")
    for name, build in BUILDERS.items():
        build(root / name)
        write_card(root / name, "image-classification")
    return root


def test_extreme_images_through_every_processor_type(image_models):
    with ServerProcess(image_models, "--reload-interval-s", "0") as server, server.client() as client:
        baseline = peak_rss_mb(server.proc.pid)
        answers = {}
        for width, height in SIZES:
            body = png(width, height)
            for name in BUILDERS:
                response = client.post(f"/models/{name}", content=body, headers={"content-type": "image/png"})
                answers[name, width, height] = response.status_code
                assert response.status_code in (200, 413), (name, width, height, response.text[:300])
                if response.status_code == 413:
                    assert "max_image_memory_mb" in response.json()["error"]
                assert server.proc.poll() is None, (name, width, height)
        peak = peak_rss_mb(server.proc.pid)
        assert client.get("/health").status_code == 200
        assert client.post("/models/mobilenet", content=png(64, 64), headers={"content-type": "image/png"}).status_code == 200
    # Shortest-edge processors refuse the slivers; fixed-size ones (ViT, EfficientNet) serve them.
    assert answers["mobilenet", 60_000, 1] == answers["resnet", 1, 60_000] == answers["convnext", 60_000, 1] == 413
    assert answers["vit", 60_000, 1] == answers["efficientnet", 1, 60_000] == 200
    assert all(answers[name, 4000, 3000] == 200 for name in BUILDERS)
    # Before the budget, 60000x1 alone took the server past 24 GB. A 4000x3000 photo decoded is ~48 MB.
    assert peak - baseline < 1024, f"peak RSS grew {peak - baseline:.0f} MB (from {baseline:.0f} MB)"
