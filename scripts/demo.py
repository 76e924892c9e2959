"""The serving half of `make demo`: start the server on models/, send one real request per demo
model (sentiment, images, sentence embeddings) with huggingface_hub's InferenceClient, print the
answers and the playground URL.

    python scripts/demo.py [--port 8000] [--exit]

Without --exit the server keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION_TEST = REPO / "assets" / "data" / "fashion_mnist" / "test.parquet"
SENTENCES = [
    "A gorgeous, witty, seductive movie that earns every one of its laughs.",
    "The plot is a mess and the jokes land with a dull thud.",
]
SIMILAR = "A charming, clever film that is funny from start to finish."


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 300) -> dict:
    """Poll /ready until every model is loaded; fail if the server dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2) as response:
                if response.status == 200:
                    with urllib.request.urlopen(f"{base}/models", timeout=5) as models:
                        return json.load(models)
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def sample_image(label_name: str = "Trouser") -> tuple[bytes, str]:
    """PNG bytes of a real Fashion-MNIST test image of the given class (upscaled for viewing)."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files={"test": str(FASHION_TEST)})["test"]
    label = ds.features["label"].str2int(label_name)
    row = ds[ds["label"].index(label)]
    buffer = io.BytesIO()
    row["image"].convert("RGB").resize((112, 112)).save(buffer, format="PNG")
    return buffer.getvalue(), label_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("HF_SERVE_PORT", 8000)))
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--exit", action="store_true", help="stop the server after the requests (for scripts)")
    args = parser.parse_args()

    # huggingface_hub reads HF_HUB_OFFLINE once, at import, and then refuses every request, even to
    # our own server on 127.0.0.1: the server keeps it (it only reads local folders), the client not.
    offline = os.environ.pop("HF_HUB_OFFLINE", "1")
    from huggingface_hub import InferenceClient

    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "service", "--models-dir", args.models_dir,
                               "--port", str(args.port), "--host", "127.0.0.1"], cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": offline})
    try:
        models = wait_ready(base, server)
        names = [m["name"] for m in models.get("models", models) if isinstance(m, dict) and "name" in m]
        print(f"\nserving {', '.join(names)} from {args.models_dir}/\n")

        if "demo-sentiment" in names:
            client = InferenceClient(model=f"{base}/models/demo-sentiment")
            for text in SENTENCES:
                top = client.text_classification(text)[0]
                print(f"demo-sentiment  {text!r}\n                -> {top.label} ({top.score:.3f})")
        if "demo-images" in names:
            client = InferenceClient(model=f"{base}/models/demo-images")
            image, truth = sample_image()
            preds = client.image_classification(image, top_k=3)
            shown = ", ".join(f"{p.label} ({p.score:.3f})" for p in preds)
            print(f"demo-images     a Fashion-MNIST test image of a {truth}\n                -> {shown}")

        if "demo-embeddings" in names:
            client = InferenceClient(model=f"{base}/models/demo-embeddings")
            vectors = client.feature_extraction(SENTENCES[0])
            similar = client.sentence_similarity(SENTENCES[0], other_sentences=[SIMILAR, SENTENCES[1]])
            print(f"demo-embeddings {vectors.shape[1]}-dimensional sentence vectors; cosine similarity of\n"
                  f"                {SENTENCES[0]!r} with\n"
                  f"                {SIMILAR!r}: {similar[0]:.3f}, with the negative review: {similar[1]:.3f}")

        print(f"\nplayground: {base}/    API docs: {base}/docs    metrics: {base}/metrics")
        print(f"try: curl -s {base}/models/demo-sentiment -H 'Content-Type: application/json' "
              "-d '{\"inputs\": \"What a delight.\"}'")
        if args.exit:
            return 0
        print("server running; Ctrl-C to stop")
        server.wait()
        return server.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
