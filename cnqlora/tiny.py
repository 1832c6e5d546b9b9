"""Tiny models and tokenizers, for the demo config and the tests.

A SentencePiece model trained on a few hundred sentences takes well under a second and behaves
like Baichuan's: BPE, byte fallback (no unknown characters), no dummy prefix, identity
normalisation, ids unk=0, bos=1, eos=2.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 1000,
                        character_coverage: float = 1.0, byte_fallback: bool = True) -> str:
    """Train a Baichuan-style SentencePiece BPE model on `texts` and write it to `model_path`."""
    import sentencepiece as spm

    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        # Small corpora cannot always fill the requested vocabulary; take what they give.
        hard_vocab_limit=False,
        # Below 1.0 the rarest characters are left to byte fallback, as in Baichuan's own model.
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        # The templates put "\n" everywhere; it must be a piece, not a byte fallback.
        user_defined_symbols=["\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=1 << 14,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(buffer.getvalue())
    return model_path


# Original file contents this writer imitates (Baichuan-7B vs Baichuan2-7B), minus the weights.
_BAICHUAN_VARIANTS = {
    "baichuan": {
        "architecture": "BaiChuanForCausalLM",
        "config_class": "BaiChuanConfig",
        "tokenizer_class": "BaiChuanTokenizer",
        "torch_dtype": "float32",
        "transformers_version": "4.29.1",
        # Baichuan-7B registered RoPE's inv_freq as a persistent buffer; Baichuan2 did not.
        "inv_freq": True,
    },
    "baichuan2": {
        "architecture": "BaichuanForCausalLM",
        "config_class": "BaichuanConfig",
        "tokenizer_class": "BaichuanTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.29.2",
        "inv_freq": False,
    },
}


def _added_token(content: str, typed: bool = True) -> dict:
    # The originals serialise special tokens as AddedToken dicts of this exact shape; the
    # "__type" marker appears in tokenizer_config.json only, not in special_tokens_map.json.
    token = {"__type": "AddedToken"} if typed else {}
    return {
        **token,
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: str, data: dict) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _tiny_baichuan_state_dict(config: dict, variant: str, seed: int):
    import torch

    dtype = getattr(torch, _BAICHUAN_VARIANTS[variant]["torch_dtype"])
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int):
        # 0.02 like the models' initializer_range keeps activations and logits small and sane.
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    def ones(n: int):
        # Not exactly 1, so a loader that ignored the norm weights would be caught.
        return (1.0 + 0.1 * torch.randn(n, generator=generator)).to(dtype)

    state = {"model.embed_tokens.weight": normal(vocab, hidden)}
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.W_pack.weight"] = normal(3 * hidden, hidden)
        state[p + "self_attn.o_proj.weight"] = normal(hidden, hidden)
        if _BAICHUAN_VARIANTS[variant]["inv_freq"]:
            state[p + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        state[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        state[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        state[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        state[p + "input_layernorm.weight"] = ones(hidden)
        state[p + "post_attention_layernorm.weight"] = ones(hidden)
    state["model.norm.weight"] = ones(hidden)
    # Unit-norm rows on average (std hidden**-0.5), as Baichuan2's NormHead has by construction.
    # With 0.02 the rows of a 64-wide head have norm ~0.16, which caps every logit near 1.3:
    # initial logits are fine either way, but LoRA (which leaves the head frozen) could then
    # barely lower the loss of the tiny Baichuan-7B model.
    head_std = hidden**-0.5
    state["lm_head.weight"] = (torch.randn(vocab, hidden, generator=generator) * head_std).to(dtype)
    return state


def _write_baichuan_weights(out_dir: str, state: dict, weights: str, shards: int) -> None:
    import torch

    stem, ext = ("pytorch_model", "bin") if weights == "bin" else ("model", "safetensors")
    single, index_name = f"{stem}.{ext}", f"{stem}.{ext}.index.json"

    def save(tensors: dict, name: str) -> None:
        path = os.path.join(out_dir, name)
        if weights == "bin":
            torch.save(tensors, path)
        else:
            from safetensors.torch import save_file

            contiguous = {k: v.contiguous() for k, v in tensors.items()}
            save_file(contiguous, path, metadata={"format": "pt"})

    if shards == 1:
        save(state, single)
        return
    keys = list(state)
    if shards > len(keys):
        raise ValueError(f"cannot split {len(keys)} tensors into {shards} shards")
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save({k: state[k] for k in part}, name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(out_dir, index_name), index)


def write_tiny_baichuan(
    out_dir: str,
    texts: Iterable[str],
    *,
    variant: str = "baichuan",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 1000,
    seed: int = 0,
    weights: str = "bin",
    shards: int = 1,
    max_position_embeddings: int = 512,
) -> str:
    """Write a tiny random Baichuan-7B ("baichuan") or Baichuan2-7B ("baichuan2") model folder.

    The folder has the exact file layout of the originals - config.json with `auto_map` pointing
    at remote code, W_pack weights (and, for Baichuan-7B, the per-layer `rotary_emb.inv_freq`
    buffers), tokenizer.model, tokenizer_config.json naming the original tokenizer class - but no
    Python files, so only a loader that needs no remote code can read it. `vocab_size` is the
    requested SentencePiece size (byte fallback alone takes 256 pieces, so ask for at least ~300
    plus the number of distinct characters); the config gets the trained tokenizer's real size.
    Returns `out_dir`.
    """
    import sentencepiece as spm

    if variant not in _BAICHUAN_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(_BAICHUAN_VARIANTS)}, not {variant!r}")
    if weights not in ("bin", "safetensors"):
        raise ValueError(f"weights must be 'bin' or 'safetensors', not {weights!r}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads")
    spec = _BAICHUAN_VARIANTS[variant]
    os.makedirs(out_dir, exist_ok=True)

    sp_path = os.path.join(out_dir, "tokenizer.model")
    train_sentencepiece(texts, sp_path, vocab_size=vocab_size)
    real_vocab = spm.SentencePieceProcessor(model_file=sp_path).get_piece_size()

    config = {
        "architectures": [spec["architecture"]],
        "auto_map": {
            "AutoConfig": f"configuration_baichuan.{spec['config_class']}",
            "AutoModelForCausalLM": f"modeling_baichuan.{spec['architecture']}",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "baichuan",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": spec["torch_dtype"],
        "transformers_version": spec["transformers_version"],
        "use_cache": True,
        "vocab_size": real_vocab,
    }
    if variant == "baichuan2":
        config = {
            "_from_model_config": True,
            **config,
            "model_max_length": max_position_embeddings,
            "tokenizer_class": spec["tokenizer_class"],
            "z_loss_weight": 0,
        }
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "transformers_version": spec["transformers_version"],
        },
    )

    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if variant == "baichuan2":
        names["pad_token"] = "<unk>"
    special = {key: _added_token(value) for key, value in names.items()}
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "auto_map": {"AutoTokenizer": [f"tokenization_baichuan.{spec['tokenizer_class']}", None]},
        **special,
        "clean_up_tokenization_spaces": False,
        # Baichuan-7B's file has transformers' "very large integer" placeholder here.
        "model_max_length": max_position_embeddings if variant == "baichuan2" else int(1e30),
        "sp_model_kwargs": {},
        "tokenizer_class": spec["tokenizer_class"],
    }
    if variant == "baichuan2":
        tokenizer_config["use_fast"] = False
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    _write_json(
        os.path.join(out_dir, "special_tokens_map.json"),
        {key: _added_token(value, typed=False) for key, value in names.items()},
    )

    state = _tiny_baichuan_state_dict(
        {
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "vocab_size": real_vocab,
        },
        variant,
        seed,
    )
    _write_baichuan_weights(out_dir, state, weights, shards)
    return out_dir


_PEOPLE = ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨帆", "赵磊", "黄敏", "周恩来", "欧阳修"]
_PLACES = ["北京", "上海", "广州", "深圳", "杭州", "南京", "武汉", "成都", "香港", "新疆维吾尔自治区"]
_ORGS = ["新华社", "清华大学", "人民银行", "国家统计局", "北京大学", "中国银行", "联合国安理会"]
_FILLERS = ["今天", "昨天", "在", "访问了", "会见", "表示", "发展", "经济", "问题", "工作", "会议", "已经",
            "取得", "进展", "，", "的", "和", "我们", "改革", "开放", "１９９７年", "记者"]


def synthetic_ner_sentences(n: int, seed: int = 0, words: tuple[int, int] = (4, 9)) -> list[list[tuple[str, str]]]:
    """MSRA-like sentences as (char, BIO tag) pairs, for tests and CPU smoke runs that must not download.

    About 40% have no entity (as in MSRA); the others mix people, places and organisations
    (multi-character, some repeated within a sentence) with filler words.
    """
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        pairs: list[tuple[str, str]] = []
        with_entities = rng.random() > 0.4
        for _ in range(rng.randint(*words)):
            kind = rng.random() if with_entities else 1.0
            if kind < 0.2:
                word, tag = rng.choice(_PEOPLE), "PER"
            elif kind < 0.4:
                word, tag = rng.choice(_PLACES), "LOC"
            elif kind < 0.5:
                word, tag = rng.choice(_ORGS), "ORG"
            else:
                word, tag = rng.choice(_FILLERS), None
            for i, ch in enumerate(word):
                pairs.append((ch, "O" if tag is None else ("B-" if i == 0 else "I-") + tag))
        pairs.append(("。", "O"))
        sentences.append(pairs)
    return sentences


def write_bio(path: str, sentences: list[list[tuple[str, str]]]) -> str:
    """Write sentences as a char<TAB>tag corpus (MSRA's format), a blank line after each."""
    with open(path, "w", encoding="utf-8") as f:
        for sentence in sentences:
            for ch, tag in sentence:
                f.write(f"{ch}\t{tag}\n")
            f.write("\n")
    return path
