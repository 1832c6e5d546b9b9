"""Shared fixtures: a small deterministic corpus and tiny Baichuan model folders built once per session."""

from __future__ import annotations

import random

import pytest

_ZH = ["我们", "今天", "天气", "很好", "北京", "上海", "中国", "人工智能", "模型", "训练", "数据",
       "实体", "识别", "地名", "人名", "机构", "微调", "问题", "回答", "学习", "大学", "医院"]
_EN = ["the", "model", "learns", "quickly", "Baichuan", "token", "data", "hello", "world",
       "fine", "tune", "with", "LoRA", "Beijing", "answer"]


def make_tiny_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Mixed Chinese / English / digit sentences, some ending in a newline."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(_ZH))
            elif r < 0.8:
                parts.append(" " + rng.choice(_EN))
            else:
                parts.append(str(rng.randint(0, 9999)))
        texts.append("".join(parts) + ("\n" if i % 3 == 0 else "。"))
    return texts


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    return make_tiny_texts()


@pytest.fixture(scope="session")
def tiny_baichuan_dir(tmp_path_factory, tiny_texts) -> str:
    """A tiny Baichuan-7B-layout folder (pytorch_model.bin, float32). Treat it as read-only."""
    from cnqlora.tiny import write_tiny_baichuan

    out = str(tmp_path_factory.mktemp("tiny_baichuan"))
    return write_tiny_baichuan(out, tiny_texts, variant="baichuan")


@pytest.fixture(scope="session")
def tiny_baichuan2_dir(tmp_path_factory, tiny_texts) -> str:
    """A tiny Baichuan2-7B-layout folder (NormHead, bfloat16 weights). Treat it as read-only."""
    from cnqlora.tiny import write_tiny_baichuan

    out = str(tmp_path_factory.mktemp("tiny_baichuan2"))
    return write_tiny_baichuan(out, tiny_texts, variant="baichuan2")


@pytest.fixture(scope="session")
def ner_bio_file(tmp_path_factory) -> str:
    """A synthetic MSRA-like BIO corpus of 400 sentences."""
    from cnqlora.tiny import synthetic_ner_sentences, write_bio

    return write_bio(str(tmp_path_factory.mktemp("bio") / "corpus.txt"), synthetic_ner_sentences(400))


@pytest.fixture(scope="session")
def ner_data_dir(tmp_path_factory, ner_bio_file) -> str:
    """train.txt (320) / dev.txt (30) / test.txt (50) in the instruction format, via the MSRA converter."""
    from cnqlora.msra import prepare_msra

    out = str(tmp_path_factory.mktemp("ner_data"))
    prepare_msra(out_dir=out, source=ner_bio_file, train_sentences=350, dev_size=30)
    return out


@pytest.fixture(scope="session")
def tiny_ner_model_dir(tmp_path_factory, ner_data_dir) -> str:
    """A tiny Baichuan-layout model whose tokenizer knows the NER data's characters."""
    import json

    from cnqlora.tiny import write_tiny_baichuan

    texts = []
    with open(f"{ner_data_dir}/train.txt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts.append(f"Human: \n{r['instruct']}\n{r['query']}\n\nAssistant: \n{r['answer']}")
    return write_tiny_baichuan(str(tmp_path_factory.mktemp("tiny_ner_model")), texts, vocab_size=1200)


# A random adapter and the tiny model loaded with it, built once per test module that asks.
@pytest.fixture(scope="module")
def adapter_dir(tiny_ner_model_dir, tmp_path_factory):
    """An adapter whose LoRA B is random, so it visibly changes the base model's output."""
    import torch

    from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model, load_tokenizer
    from cnqlora.training import save_adapter

    torch.manual_seed(0)
    model, _ = attach_lora(load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")), LoraArgs())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    dest = str(tmp_path_factory.mktemp("adapter") / "adapter_model")
    return save_adapter(model, load_tokenizer(tiny_ner_model_dir), dest, "template: baichuan\n")


@pytest.fixture(scope="module")
def loaded(tiny_ner_model_dir, adapter_dir):
    """The tiny model with `adapter_dir`, as predict.py loads them (4-bit base + LoRA, CPU)."""
    from cnqlora.data import PromptArgs
    from cnqlora.inference import load_for_inference
    from cnqlora.models import ModelArgs

    return load_for_inference(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"), PromptArgs(),
                              adapter_dir)
