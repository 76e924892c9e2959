"""Conversations built from the packaged Rotten Tomatoes reviews, for the `demo-generate` recipe.

    python -m training.review_chats [--out assets/data/review_chats] [--held_out 400]

Each conversation is a user asking for a positive or negative one-sentence review of about N words and
the assistant answering with a real review sentence of that polarity and length (Rotten Tomatoes train:
8,530 lowercased, tokenised sentences). A seeded `--held_out` of them goes to `test.jsonl` and is never
trained on: the perplexity of the assistant's turns there, before and after fine-tuning, is the
recipe's number. Writes `train.jsonl` and `test.jsonl` (a `messages` column), atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "assets" / "data" / "rotten_tomatoes" / "train.csv"
OUT = REPO / "assets" / "data" / "review_chats"
ASKS = (
    "Write a {label} review of a movie in one sentence of about {words} words.",
    "Give me a {label} one-sentence movie review, around {words} words long.",
    "In about {words} words, write a {label} review of a film.",
)


def conversation(text: str, label: str, rng: random.Random) -> dict:
    words = max(5, 5 * round(len(text.split()) / 5))
    ask = rng.choice(ASKS).format(label=label, words=words)
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": text}]}


def build(source: Path = SOURCE, out: Path = OUT, held_out: int = 400, seed: int = 0) -> tuple[int, int]:
    if not source.is_file():
        raise SystemExit(f"{source} is missing: run `make assets`")
    with source.open(newline="", encoding="utf-8") as f:
        rows = [(r["text"].strip(), r["label"]) for r in csv.DictReader(f) if r["text"].strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    chats = [conversation(text, label, rng) for text, label in rows]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test.jsonl", chats[:held_out]), ("train.jsonl", chats[held_out:])):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in part), encoding="utf-8")
        os.replace(tmp, out / name)
    return len(chats) - held_out, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--held_out", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = build(args.source, args.out, args.held_out, args.seed)
    print(f"{train:,} training and {test:,} held-out conversations in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
