"""service/adapters.py: PEFT adapter folders served like any folder, merged or sharing one base;
answers equal PEFT's own merged model, in both modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from service.folders import InvalidFolder, inspect_folder
from tests.service.service_helpers import LiveServer, Settings, build_tiny_bert, build_tiny_gpt2, wait_ready

TEXTS = ["a fine film", "dull and long", "I laughed", "the cast shines"]


def make_classifier_adapter(base, out, seed: int, labels=("bad", "good")):
    """What `--use_peft --merge_adapter false` writes: adapter + the fine-tuned config + tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)  # a trained adapter is not zero
    peft_model.save_pretrained(out)
    peft_model.config.save_pretrained(out)  # the fine-tuned config.json (labels) beside the adapter
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base.name}))
    return peft_model.merge_and_unload().eval()


def make_lm_adapter(base, out, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)  # no tokenizer: the base's is used
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base.name}))
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-models")
    build_tiny_bert(root / "bert-base")  # a base model: BertModel, no head (served as failed, itself)
    build_tiny_gpt2(root / "gpt2-base")
    references = {f"cls-{i}": make_classifier_adapter(root / "bert-base", root / f"cls-{i}", seed=i) for i in range(3)}
    references["lm"] = make_lm_adapter(root / "gpt2-base", root / "lm", seed=7)
    return root, references


def expected_scores(model, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    with torch.inference_mode():
        return torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], -1)


@pytest.mark.parametrize("mode", ["merge", "share"])
def test_adapters_answer_like_peft_merged_models(adapter_dir, mode):
    from transformers import AutoTokenizer

    root, references = adapter_dir
    settings = Settings(models_dir=root, reload_interval_s=0, adapter_mode=mode, _env_file=None)
    with LiveServer(settings) as live, live.client() as client:
        wait_ready(client)
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert {models[f"cls-{i}"]["status"] for i in range(3)} == {"ready"} and models["lm"]["status"] == "ready"
        assert models["cls-0"]["task"] == "text-classification" and models["cls-0"]["labels"] == ["bad", "good"]
        assert models["lm"]["task"] == "text-generation"
        for i in range(3):
            # interleaved requests to different adapters: each gets its own adapter's answer
            for text in TEXTS:
                got = {d["label"]: d["score"] for d in client.post(f"/models/cls-{i}", json={"inputs": text}).json()[0]}
                reference = references[f"cls-{i}"]
                reference.name_or_path = str(root / "bert-base")
                want = expected_scores(reference, text)
                assert got["bad"] == pytest.approx(float(want[0]), abs=1e-4)
                assert got["good"] == pytest.approx(float(want[1]), abs=1e-4)
        out = client.post("/models/lm", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "details": True}}).json()[0]
        ids = [t["id"] for t in out["details"]["tokens"]]
        tokenizer = AutoTokenizer.from_pretrained(root / "gpt2-base")
        prompt = tokenizer("Hello world")["input_ids"]
        with torch.inference_mode():
            logits = references["lm"](input_ids=torch.tensor([prompt + ids])).logits[0]
        want = torch.log_softmax(logits[len(prompt) - 1:-1], -1)[torch.arange(len(ids)), ids]
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in out["details"]["tokens"]]), want, atol=1e-4, rtol=0)
        if mode == "share":  # one base in memory for the three classifier adapters
            from service.adapters import _SHARED

            bases = [s for s in _SHARED.values() if len(s.adapters) == 3]
            assert len(bases) == 1
        shutil.rmtree(root / "cls-2")  # removing an adapter unloads it (and keeps the others serving)
        client.post("/admin/reload")
        assert client.post("/models/cls-0", json={"inputs": "fine"}).status_code == 200
    make_classifier_adapter(root / "bert-base", root / "cls-2", seed=2)


def test_an_adapter_without_its_base_says_why(adapter_dir, tmp_path, monkeypatch):
    root, _ = adapter_dir
    lonely = shutil.copytree(root / "cls-0", tmp_path / "models" / "lonely")
    config = json.loads((lonely / "adapter_config.json").read_text())
    (lonely / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/missing-base"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidFolder, match="missing-base.*offline"):
        inspect_folder(lonely, models_dir=tmp_path / "models")
    local = inspect_folder(root / "cls-0", models_dir=root)
    assert local.adapter.base_path == (root / "bert-base").resolve() and local.task == "text-classification"
    (lonely / "adapter_config.json").write_text(json.dumps(config))  # its base again (a sibling in root)
    (lonely / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidFolder, match="adapter_model.safetensors"):
        inspect_folder(lonely, models_dir=root)
