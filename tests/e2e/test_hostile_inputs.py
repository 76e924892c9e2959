"""Hostile and malformed inputs: each one a 4xx with a clear message, and the server keeps serving.

(The plain validation cases, one per field, are in test_endpoints.py; these are the nastier ones.)
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.scores import assert_scores_close
from tests.service.service_helpers import LiveServer, Settings, make_models_dir, wait_ready


@pytest.fixture(autouse=True)
def still_serving(http):
    yield
    assert http.get("/health").status_code == 200
    assert http.post("/models/sentiment", json={"inputs": "still here"}).status_code == 200


def error(response, status: int, error_type: str | None = None) -> str:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error"], body
    if error_type:
        assert body["error_type"] == error_type, body
    return body["error"]


def image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: a valid RGB PNG of width x height black pixels, whose IDAT is a few
    hundred kB of zlib (a decoder would need width*height*3 bytes)."""
    header = png_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    compressor = zlib.compressobj(9)
    row = bytes(1 + width * 3)  # filter byte + black pixels
    rows_per_chunk = max(1, (1 << 20) // len(row))
    parts, left = [], height
    while left:
        n = min(rows_per_chunk, left)
        parts.append(compressor.compress(row * n))
        left -= n
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


# -- JSON and types --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "needle"), [
    (b'{"inputs": "x"', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"inputs": "x", "parameters": {"top_k": NaN}}', "parameters.top_k"),
    (b'{"inputs": "x", "parameters": {"top_k": 1' + b"0" * 5000 + b"}}", "not valid JSON"),
    (b'"just a string"', "body"),
    (b"null", "body"),
])
def test_broken_json(http, body, needle):
    message = error(http.post("/models/sentiment", content=body, headers={"content-type": "application/json"}),
                    422, "validation")
    assert needle in message


@pytest.mark.parametrize(("model", "body", "needle"), [
    ("sentiment", {"inputs": {"text": "x"}}, "inputs"),
    ("sentiment", {"inputs": ["ok", 5]}, "inputs.1"),
    ("sentiment", {"inputs": "x", "parameters": {"top_k": "2"}}, "parameters.top_k"),  # no silent coercion
    ("sentiment", {"inputs": "x", "parameters": {"top_k": 1.5}}, "parameters.top_k"),
    ("sentiment", {"inputs": "x", "parameters": {"top_k": -3}}, "parameters.top_k"),
    ("sentiment", {"inputs": "x", "parameters": {"truncate": "yes"}}, "parameters.truncate"),
    ("sentiment", {"inputs": "x", "extra_field": 1}, "extra_field"),
    ("sentiment", {"inputs": "x", "parameters": []}, "parameters"),
    ("writer", {"inputs": "x", "parameters": {"max_new_tokens": 513}}, "max_new_tokens"),
    ("writer", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ("writer", {"inputs": "x", "parameters": {"top_k": 0}}, "parameters.top_k"),
    ("writer", {"inputs": "x", "parameters": {"temperature": 1e-300}}, "parameters.temperature"),
    ("writer", {"inputs": "x", "parameters": {"repetition_penalty": 1e-300}}, "parameters.repetition_penalty"),
    ("writer", {"inputs": "x", "parameters": {"seed": 2**64}}, "parameters.seed"),
    ("writer", {"inputs": "x", "parameters": {"stop": ["a"] * 9}}, "parameters.stop"),
    ("writer", {"inputs": "x", "parameters": {"do_sample": 1}}, "parameters.do_sample"),
    ("writer", {"inputs": "x", "parameters": {"unknown": True}}, "parameters.unknown"),
    ("writer", {"inputs": ["a", "b"]}, "inputs"),
    ("mobilenet", {"inputs": 12}, "inputs"),
    ("mobilenet", {"inputs": "x", "parameters": {"top_k": 0}}, "parameters.top_k"),
])
def test_wrong_types_and_values(http, model, body, needle):
    assert needle in error(http.post(f"/models/{model}", json=body), 422, "validation")


def test_batch_far_over_the_cap_is_refused_cheaply(http):
    message = error(http.post("/models/sentiment", json={"inputs": ["x"] * 200_000}), 422, "validation")
    assert "at most 32" in message


def test_huge_top_k_returns_every_label(http):
    out = http.post("/models/topics", json={"inputs": "x", "parameters": {"top_k": 10**12}})
    assert out.status_code == 200 and len(out.json()[0]) == 3
    gen = http.post("/models/writer", json={"inputs": "Hi", "parameters": {"top_k": 10**12, "seed": 1, "max_new_tokens": 3}})
    assert gen.status_code == 200


def test_empty_and_one_megabyte_strings(http):
    assert http.post("/models/sentiment", json={"inputs": ""}).status_code == 200  # [CLS] [SEP]: a valid input
    assert "inputs" in error(http.post("/models/writer", json={"inputs": ""}), 422, "validation")
    big = "lorem ipsum " * ((1 << 20) // 12)  # 1 MB
    long = http.post("/models/sentiment", json={"inputs": big})
    assert long.status_code == 200 and len(long.json()[0]) == 2  # truncated to the model's length
    # cut to max_input_chars before tokenizing: the same answer as the text's first 512 tokens
    assert_scores_close(long.json(), http.post("/models/sentiment", json={"inputs": big[:4000]}).json())
    refused = error(http.post("/models/sentiment", json={"inputs": big, "parameters": {"truncate": False}}), 422)
    assert "max_input_chars" in refused and "truncate" in refused
    over_limit = "lorem ipsum " * 300  # 3,600 characters, still far more than the tiny model's 128 tokens
    assert "tokens" in error(http.post("/models/sentiment", json={"inputs": over_limit, "parameters": {"truncate": False}}), 422)
    prompt = http.post("/models/writer", json={"inputs": big, "parameters": {"max_new_tokens": 2}})
    assert prompt.status_code == 200  # the end of the prompt is kept, as TGI does
    assert error(http.post("/models/mobilenet", json={"inputs": big}), 422, "validation")


def test_request_text_is_bounded_before_tokenizing(http):
    """32 strings of 300 kB: each is cut to max_input_chars (16,384), and their sum is still over
    max_request_chars (262,144): refused before any tokenizing. Under the cap, the same texts pass."""
    texts = ["lorem ipsum " * 25_000] * 32
    message = error(http.post("/models/sentiment", json={"inputs": texts}), 413, "payload_too_large")
    assert "max_request_chars" in message
    fine = http.post("/models/sentiment", json={"inputs": texts[:8]})
    assert fine.status_code == 200 and len(fine.json()) == 8


# -- images ----------------------------------------------------------------------------------------------

def test_invalid_base64_and_urls(http):
    for bad in ("%%%%", "aGVsbG8", "data:image/png;base64,@@@", "x" * 1001):
        assert "base64" in error(http.post("/models/mobilenet", json={"inputs": bad}), 422, "validation")
    for url in ("http://127.0.0.1:1/cat.png", "https://example.com/cat.jpg", "file:///etc/passwd", " ftp://x/y"):
        message = error(http.post("/models/mobilenet", json={"inputs": url}), 422, "validation")
        assert "URLs are not fetched" in message


@pytest.mark.parametrize("payload", [b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM" + bytes(60), b"\x00" * 5000,
                                     b"%PDF-1.4\n", b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_non_images(http, payload):
    assert "could not decode" in error(http.post("/models/mobilenet", content=payload, headers={"content-type": "image/png"}),
                                       415, "unsupported_media_type")


def test_truncated_images(http, coffee_jpeg, cat_png):
    for data, kind in ((coffee_jpeg, "jpeg"), (cat_png, "png")):
        cut = data[: len(data) // 2]
        message = error(http.post("/models/mobilenet", content=cut, headers={"content-type": f"image/{kind}"}), 415)
        assert "truncated or corrupt" in message or "could not decode" in message
        as_b64 = http.post("/models/mobilenet", json={"inputs": base64.b64encode(cut).decode()})
        assert as_b64.status_code == 415


@pytest.mark.parametrize(("width", "height"), [(8000, 8000), (60000, 60000)])
def test_decompression_bomb_is_refused_before_decoding(http, width, height):
    if width * height < 10**8:  # 64 MP: under PIL's own limit (89 MP), over max_image_pixels (40 MP)
        bomb = png_bomb(width, height)
    else:  # a header claiming 3.6 gigapixels (PIL's DecompressionBombError range), no pixel data
        bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                                  + bytes([8, 2, 0, 0, 0])) + png_chunk(b"IEND", b""))
    assert len(bomb) < 1_000_000  # small on the wire, 192 MB (or 10 GB) once decoded
    response = http.post("/models/mobilenet", content=bomb, headers={"content-type": "image/png"})
    message = error(response, 413, "payload_too_large")
    assert "pixels" in message  # refused from the header's dimensions, before any pixel is decoded


def test_animated_gif_is_refused(http):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    gif = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert "animated" in error(http.post("/models/mobilenet", content=gif, headers={"content-type": "image/gif"}), 422)
    still = image_bytes(frames[0], "GIF")  # a one-frame GIF is an ordinary image
    assert http.post("/models/mobilenet", content=still, headers={"content-type": "image/gif"}).status_code == 200


def test_unusual_modes_are_converted_not_crashed(http):
    """16-bit, CMYK, palette and alpha images are valid pictures: converted to 8-bit RGB and classified."""
    rng = np.random.default_rng(0)
    gray16 = Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16))
    assert gray16.mode.startswith("I")
    cases = {
        "16-bit PNG": image_bytes(gray16, "PNG"),
        "CMYK JPEG": image_bytes(Image.new("CMYK", (40, 48), (0, 128, 255, 10)), "JPEG"),
        "palette PNG": image_bytes(Image.new("RGB", (40, 48), "orange").convert("P"), "PNG"),
        "RGBA PNG": image_bytes(Image.new("RGBA", (40, 48), (10, 20, 30, 128)), "PNG"),
        "1-bit BMP": image_bytes(Image.new("1", (40, 48), 1), "BMP"),
        "1x1 PNG": image_bytes(Image.new("RGB", (1, 1)), "PNG"),
    }
    for name, data in cases.items():
        response = http.post("/models/mobilenet", content=data)
        assert response.status_code == 200, (name, response.text)
        assert len(response.json()) == 3


def test_multipart_oddities(http, cat_png):
    no_file = http.post("/models/mobilenet", data={"top_k": "1"}, files={})
    assert no_file.status_code in (415, 422)
    bad_params = http.post("/models/mobilenet", files={"file": ("c.png", cat_png, "image/png")}, data={"parameters": "true"})
    assert "JSON object" in error(bad_params, 422, "validation")
    broken = http.post("/models/mobilenet", content=b"--xx\r\nnot a part",
                       headers={"content-type": "multipart/form-data; boundary=xx"})
    assert broken.status_code == 422


# -- names -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw_path", [
    "/models/..", "/models/%2e%2e", "/models/..%2Fsentiment", "/models/sentiment%2F..", "/models/%2Fetc%2Fpasswd",
    "/models/sentiment%00", "/models/%00", "/models/.tmp-topics-swap", "/models/" + "a" * 5000,
    "/models/..%5C..%5Cwindows", "/models/%252e%252e",
])
def test_model_names_never_reach_the_filesystem(live, raw_path):
    """Names are only looked up among the scanned folders: traversal and NUL bytes are unknown names."""
    for method in ("GET", "POST"):
        status, body = raw_request(live.url, method, raw_path, b'{"inputs": "x"}')
        assert status == 404, (method, raw_path, status, body[:200])
        assert json.loads(body)["error_type"] == "not_found"


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the path sent byte for byte (httpx would normalise `..`)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(body)}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


# -- size and speed of the body --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_server(pristine_models, tmp_path_factory):
    models_dir = make_models_dir(pristine_models, tmp_path_factory.mktemp("strict"), ["sentiment", "mobilenet"])
    settings = Settings(models_dir=models_dir, reload_interval_s=0, max_request_bytes=64 * 1024, body_timeout_s=1.5,
                        _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        yield server


def open_request(url: str, content_length: int, first: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /models/sentiment HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {content_length}\r\n\r\n".encode() + first)
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or (b"content-length" in data.lower() and not data.endswith(b"}")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]), data


def test_oversized_body_refused_before_it_is_sent(strict_server):
    """Content-Length 1 GB, nothing sent: the 413 comes at once, the server never waits for the body."""
    sock = open_request(strict_server.url, 1 << 30)
    sock.settimeout(10)
    try:
        status, data = read_status(sock)
    finally:
        sock.close()
    assert status == 413 and b"payload_too_large" in data


def test_slow_client_does_not_block_others_and_times_out(strict_server):
    stalled = open_request(strict_server.url, 1000, b'{"inputs": "')  # then nothing
    trickle = open_request(strict_server.url, 1000, b'{"inputs": "')
    stop = threading.Event()

    def drip():  # one byte every 0.2 s: never idle, but never done either
        while not stop.is_set():
            try:
                trickle.sendall(b"a")
            except OSError:
                return
            time.sleep(0.2)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        with strict_server.client() as client:
            for _ in range(5):  # others are served meanwhile
                assert client.post("/models/sentiment", json={"inputs": "meanwhile"}).status_code == 200
        for sock in (stalled, trickle):
            sock.settimeout(10)
            status, data = read_status(sock)
            assert status == 408 and b"request_timeout" in data
    finally:
        stop.set()
        stalled.close()
        trickle.close()
        dripper.join(5)
    with strict_server.client() as client:
        assert client.post("/models/sentiment", json={"inputs": "after"}).status_code == 200
        assert strict_server.app.state.in_flight == 0


def test_chunked_body_over_the_limit(strict_server):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    with strict_server.client() as client:
        response = client.post("/models/mobilenet", content=chunks(), headers={"content-type": "image/png"})
        assert response.status_code == 413
        assert client.post("/models/sentiment", json={"inputs": "ok"}).status_code == 200
