"""Conversational data for text-generation (training/tasks/text_generation.py): labels are -100 everywhere
but the assistant tokens (checked token by token on SmolLM2's real chat template), padding is masked by
position (pad is EOS), the template is saved, generation stops at the end of an assistant turn, and bad
conversations are refused up front with one line naming the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from tests.tiny_models import build_tiny_llama_chat, smollm2_dir
from training.finetune import main
from training.tasks.text_generation import IGNORE, end_of_turn_token, pad_collator, tokenize_conversation

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CONVERSATION = [
    {"role": "user", "content": "Write a positive review of a film, in one sentence."},
    {"role": "assistant", "content": "A gorgeous, witty, seductive movie."},
    {"role": "user", "content": "And a negative one?"},
    {"role": "assistant", "content": "The story is lame, the jokes are flat and it is far too long."},
]
# SmolLM2's template with {% generation %} blocks around what the assistant writes (its own has none).
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_llama_chat(tmp_path_factory.mktemp("models") / "tiny-llama-chat")


def expected_assistant_mask(tokenizer, ids: list[int]) -> list[bool]:
    """ChatML read token by token: inside an `<|im_start|>assistant\\n` turn up to and including its `<|im_end|>`."""
    start, end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    mask, inside, i = [], False, 0
    while i < len(ids):
        if ids[i] == start:
            header = []
            j = i + 1
            while tokenizer.decode(header) != "assistant\n" and j < len(ids) and len(header) < 4:
                header.append(ids[j])
                j += 1
            is_assistant = tokenizer.decode(header) == "assistant\n"
            mask += [False] * (1 + (len(header) if is_assistant else 0))
            i += 1 + (len(header) if is_assistant else 0)
            inside = is_assistant
            continue
        mask.append(inside)
        if ids[i] == end:
            inside = False
        i += 1
    return mask


@pytest.mark.parametrize("system", [False, True])
def test_labels_are_the_assistant_tokens_only_on_smollm2_template(system, smol_tokenizer):
    messages = ([{"role": "system", "content": "You review films."}] if system else []) + CONVERSATION
    encoded = tokenize_conversation(smol_tokenizer, messages, 512, assistant_only=True)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids == smol_tokenizer(smol_tokenizer.apply_chat_template(messages, tokenize=False),
                                 add_special_tokens=False)["input_ids"]
    mask = expected_assistant_mask(smol_tokenizer, ids)
    assert len(mask) == len(ids)
    for position, (token, label, inside) in enumerate(zip(ids, labels, mask, strict=True)):
        assert label == (token if inside else IGNORE), (position, smol_tokenizer.decode([token]))
    # Exactly each assistant message and the <|im_end|> that ends its turn (the model learns to stop).
    trained = smol_tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "".join(m["content"] + IM_END for m in CONVERSATION if m["role"] == "assistant")
    assert labels.count(smol_tokenizer.eos_token_id) == 2  # eos is <|im_end|>, id 2

    every = tokenize_conversation(smol_tokenizer, messages, 512, assistant_only=False)
    assert every["labels"] == ids
    cut = tokenize_conversation(smol_tokenizer, messages, 40, assistant_only=True)
    assert cut["input_ids"] == ids[:40] and cut["labels"] == labels[:40]


def test_a_generation_block_template_gives_the_same_labels(smol_tokenizer):
    """transformers' assistant mask ({% generation %}) and our turn-by-turn rendering agree."""
    own = tokenize_conversation(smol_tokenizer, CONVERSATION, 512, assistant_only=True)
    marked = AutoTokenizer.from_pretrained(smollm2_dir())
    marked.chat_template = GENERATION_TEMPLATE
    generation = tokenize_conversation(marked, CONVERSATION, 512, assistant_only=True)
    assert generation == own


def test_padding_is_masked_by_position_not_by_token_id(smol_tokenizer):
    """pad == eos == <|im_end|>: the labels of real <|im_end|> tokens stay, the padding's are -100."""
    assert smol_tokenizer.pad_token_id == smol_tokenizer.eos_token_id
    short = tokenize_conversation(smol_tokenizer, CONVERSATION[:2], 512, assistant_only=True)
    long = tokenize_conversation(smol_tokenizer, CONVERSATION, 512, assistant_only=True)
    batch = pad_collator(smol_tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0, :n].tolist() == short["labels"] and (batch["labels"][0, n:] == IGNORE).all()
    assert (batch["input_ids"][0, n:] == smol_tokenizer.eos_token_id).all()
    assert batch["labels"][0, n - 2].item() == smol_tokenizer.eos_token_id  # its own <|im_end|> (before "\n")
    assert batch["labels"][1].tolist() == long["labels"]
    assert end_of_turn_token(smol_tokenizer) == smol_tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------
# End to end on a tiny Llama with SmolLM2's tokenizer and template.


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about film {i}."},
                          {"role": "assistant", "content": f"Film {i} is {'great' if i % 2 else 'dull'}."}]}
            for i in range(offset, offset + n)]


def test_conversational_run_saves_the_template_and_answers_chat_messages(tiny_chat_model, smol_tokenizer, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _chat_rows(24))
    test = _write_jsonl(tmp_path / "test.jsonl", _chat_rows(6, offset=100))
    out = tmp_path / "models" / "chat"
    assert main(["--task", "text-generation", "--model_name_or_path", str(tiny_chat_model), "--train_file", str(train),
                 "--validation_file", str(test), "--output_dir", str(out), "--max_train_steps", "3",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--eval_on_start",
                 "--num_sample_generations", "2", "--checkpointing_steps", "none"]) == 0
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir() / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    results = json.loads((out / "all_results.json").read_text())
    # Perplexity over the held-out assistant tokens only: their number, <|im_end|> included.
    expected_tokens = sum(sum(lab != IGNORE for lab in tokenize_conversation(smol_tokenizer, row["messages"], 128,
                                                                             True)["labels"])
                          for row in _chat_rows(6, offset=100))
    assert results["eval_tokens"] == results["start_eval_tokens"] == expected_tokens
    assert results["start_eval_perplexity"] > 1 and results["eval_perplexity"] > 1
    card = (out / "README.md").read_text()
    assert "## Sample generations" in card and "Tell me about film 100." in card

    chat = pipeline("text-generation", model=str(out))
    reply = chat([{"role": "user", "content": "Tell me about film 7."}], max_new_tokens=3, min_new_tokens=1,
                 do_sample=False)[0]["generated_text"]
    assert [m["role"] for m in reply] == ["user", "assistant"]  # the template was applied, an answer appended


def test_prompt_completion_columns_and_a_template_given_with_chat_template(tiny_gpt2, tmp_path):
    """GPT-2 has no chat template: --chat_template gives one (ending turns with EOS), prompt/completion rows."""
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"prompt": f"Review {i}?", "completion": f"Film {i} was fine."} for i in range(20)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "models" / "gpt2-chat"
    assert main(["--task", "text-generation", "--model_name_or_path", str(tiny_gpt2), "--train_file", str(train),
                 "--output_dir", str(out), "--chat_template", template, "--max_train_steps", "2",
                 "--per_device_train_batch_size", "4", "--checkpointing_steps", "none",
                 "--num_sample_generations", "0"]) == 0
    assert (out / "chat_template.jinja").read_text() == template
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenize_conversation(tokenizer, [{"role": "user", "content": "Review 1?"},
                                                {"role": "assistant", "content": "Film 1 was fine."}], 64, True)
    trained = [t for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True) if lab != IGNORE]
    # GPT-2's BPE puts the prompt's last space into the answer's first token (" Film"): it is the assistant's.
    assert tokenizer.decode(trained) == " Film 1 was fine.<|endoftext|>"


def _bad_run(model: Path, train: Path, *extra: str) -> int:
    return main(["--task", "text-generation", "--model_name_or_path", str(model), "--train_file", str(train),
                 "--output_dir", "models/bad", *extra])


def test_conversations_on_a_model_without_chat_template_are_refused_up_front(tiny_gpt2, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _chat_rows(10))
    assert _bad_run(tiny_gpt2, train) == 2
    err = capsys.readouterr().err
    assert f"the data is conversational but {tiny_gpt2} has no chat template: give one with --chat_template" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize(("row", "problem"), [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]}, "message 0 of `messages` has no role"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "message 0 of `messages` has an unknown role 'robot' (roles: system, user, assistant, tool)"),
    ({"messages": "hello there"}, "`messages` is not a list of {role, content} messages (got str)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant message to learn from"),
])
def test_a_malformed_conversation_is_named_by_its_row(row, problem, tiny_chat_model, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", [*_chat_rows(2), row, *_chat_rows(3)])
    assert _bad_run(tiny_chat_model, train) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: row 3 of {train}: {problem}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_assistant_only_loss_needs_conversations(tiny_gpt2, rt_small, tmp_path, capsys):
    assert _bad_run(tiny_gpt2, rt_small[0], "--assistant_only_loss", "true") == 2
    assert "--assistant_only_loss needs conversational data" in capsys.readouterr().err


def test_labels_of_a_batch_reach_the_loss_as_assistant_tokens_only(smol_tokenizer):
    """The loss the model computes from the collated labels is the mean over assistant tokens."""
    examples = [tokenize_conversation(smol_tokenizer, CONVERSATION[:2], 512, True),
                tokenize_conversation(smol_tokenizer, CONVERSATION, 512, True)]
    batch = pad_collator(smol_tokenizer.pad_token_id)(examples)
    counted = (batch["labels"][:, 1:] != IGNORE).sum().item()
    assert counted == sum(sum(lab != IGNORE for lab in e["labels"]) for e in examples)
    assert torch.equal(batch["labels"] != IGNORE, (batch["labels"] != IGNORE) & batch["attention_mask"].bool())
