"""Baichuan-7B and Baichuan2-7B without remote code.

Both models are LLaMA with two differences in how the checkpoint is laid out:

- q, k and v are one fused `W_pack` Linear(hidden, 3 * hidden): rows [0:h] are q, [h:2h] k,
  [2h:3h] v. Keeping the fused module (and its parameter name) lets the original checkpoints load
  as they are, and is what LoRA must target (`target_modules=["W_pack"]`).
- Baichuan2's `lm_head` is a "NormHead": its rows are L2-normalised at run time.

The official `modeling_baichuan.py` / `tokenization_baichuan.py` files break on transformers
>= 4.34, and executing code from a model folder is something we never want anyway. So the
classes here subclass transformers' own Llama classes and only replace what differs: the
attention's projections (its forward is rewritten, everything else - decoder layer, model,
causal-LM head, generation, KV cache, sdpa/eager attention, masks, gradient checkpointing - is
inherited), plus `NormHead`. `register()` (run at import) maps `model_type: baichuan` to these
classes in the Auto* factories, so `AutoModelForCausalLM.from_pretrained(folder)` picks them
even though the folder's config.json carries an `auto_map` that points at remote code: with
local classes registered, transformers resolves `trust_remote_code=None` to False.

The code supports two transformers generations whose APIs differ in one place we touch: 5.17
hands the KV cache to attention as `past_key_values=` and 5.24 as `cache=` (with an extra
`kwargs=` keyword on `update`). The attention forward accepts either name and calls
`update(key, value, layer_idx)` positionally, which both accept.

Baichuan-13B and Baichuan2-13B use ALiBi instead of RoPE and are not implemented; see
`unsupported_reason`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
)
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from .errors import UserError

__all__ = [
    "BAICHUAN2_VOCAB_SIZE",
    "BaiChuanTokenizer",
    "BaichuanAttention",
    "BaichuanConfig",
    "BaichuanDecoderLayer",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "NormHead",
    "is_baichuan_folder",
    "llama_config_from_baichuan",
    "load_baichuan_tokenizer",
    "register",
    "split_w_pack",
    "unsupported_reason",
]

BAICHUAN2_VOCAB_SIZE = 125696
# Width of Baichuan-13B and Baichuan2-13B, the ALiBi models.
_ALIBI_HIDDEN_SIZE = 5120


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def unsupported_reason(config: Any) -> str | None:
    """Why a Baichuan config (config object or config.json dict) cannot be loaded, or None."""
    hidden = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    if hidden == _ALIBI_HIDDEN_SIZE:
        return (
            f"This looks like Baichuan-13B or Baichuan2-13B (hidden_size={hidden}, "
            f"num_hidden_layers={layers}). Those models use ALiBi position biases instead of "
            "rotary embeddings, which cnqlora does not implement; only Baichuan-7B and "
            "Baichuan2-7B are supported."
        )
    kv_heads = _get(config, "num_key_value_heads")
    heads = _get(config, "num_attention_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        return (
            f"num_key_value_heads={kv_heads} differs from num_attention_heads={heads}; Baichuan's "
            "fused W_pack projection has as many key/value heads as query heads."
        )
    return None


def _infer_norm_head(vocab_size: int | None, architectures: Any, hidden_size: int | None) -> bool:
    # The original config.json files carry no flag for the NormHead, so it is inferred:
    # - vocab 125696 is Baichuan2's tokenizer, and every Baichuan2 model has a NormHead;
    # - Baichuan-7B's class is spelled "BaiChuanForCausalLM" while every Baichuan2 model spells it
    #   "BaichuanForCausalLM". Tiny test models have small vocabularies, so the spelling is what
    #   tells them apart. Baichuan-13B (no NormHead) also spells it "BaichuanForCausalLM" but has
    #   the 13B width, and is refused anyway (ALiBi).
    # Configs we save always carry an explicit `norm_head`, so our own saved class name (also
    # "BaichuanForCausalLM") never reaches this inference.
    if vocab_size == BAICHUAN2_VOCAB_SIZE:
        return True
    baichuan2_name = list(architectures or []) == ["BaichuanForCausalLM"]
    return baichuan2_name and hidden_size != _ALIBI_HIDDEN_SIZE


@strict
class BaichuanConfig(LlamaConfig):
    """LLaMA config with Baichuan-7B defaults; reads the original Baichuan(2)-7B config.json files.

    `norm_head`: whether lm_head is Baichuan2's NormHead. None (the default) infers it from the
    vocabulary size and the architecture name (see `_infer_norm_head`); it is stored as a bool,
    and saved configs always carry it. The originals' `auto_map` is read and dropped.
    """

    model_type = "baichuan"
    # Llama's tensor-parallel plan names q/k/v_proj; a column split of the fused W_pack would
    # hand each rank a mix of q, k and v rows, so no plan is better than a wrong one.
    base_model_tp_plan = None

    vocab_size: int = 64000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    norm_head: bool | None = None

    def __post_init__(self, **kwargs):
        if self.norm_head is None:
            self.norm_head = _infer_norm_head(self.vocab_size, self.architectures, self.hidden_size)
        # The original auto_map points at configuration_/modeling_baichuan.py. Those files are
        # never used here, and keeping the pointer would make every folder we save name Python
        # files it does not contain.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)


class NormHead(nn.Module):
    """Baichuan2's output layer: logits = hidden @ normalize(weight, dim=-1).T.

    Deliberately not an nn.Linear, so bitsandbytes leaves it unquantized (normalising 4-bit rows
    would be meaningless) and peft does not mistake it for a LoRA target. The weight is cast to
    the activations' dtype at run time, so it works whatever dtype the loader gave it.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype != hidden_states.dtype:
            weight = weight.to(hidden_states.dtype)
        # Normalised on every call, never cached in place like the original did in eval mode, so
        # the stored weight stays the checkpoint's and saving after inference writes it unchanged.
        return F.linear(hidden_states, F.normalize(weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class BaichuanAttention(LlamaAttention):
    """Llama attention whose q/k/v come from the fused `W_pack` projection."""

    def __init__(self, config: BaichuanConfig, layer_idx: int):
        # Skip LlamaAttention.__init__: it would allocate q/k/v_proj only for us to delete them.
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers 5.24 passes the KV cache as `cache`, 5.17 as `past_key_values`. Cache
        # objects define __len__, so an empty one is falsy: test against None, never truthiness.
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        if cache is None:
            cache = legacy_cache

        input_shape = hidden_states.shape[:-1]
        qkv = self.W_pack(hidden_states)
        query, key, value = (
            t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
            for t in qkv.split(self.hidden_size, dim=-1)
        )

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class BaichuanDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer (forward inherited) around a BaichuanAttention."""

    def __init__(self, config: BaichuanConfig, layer_idx: int):
        # GradientCheckpointingLayer's init (plain nn.Module), not Llama's, which would build a
        # LlamaAttention with unfused projections first.
        super(LlamaDecoderLayer, self).__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = BaichuanAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class BaichuanPreTrainedModel(LlamaPreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    _no_split_modules = ["BaichuanDecoderLayer"]
    # The original Baichuan-7B checkpoint stores RoPE frequencies per layer; they are recomputed.
    # transformers 5.x already skips such keys itself; naming them keeps that independent of it.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, NormHead):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range or 0.02)


def _check_supported(config: BaichuanConfig) -> None:
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(reason)


class BaichuanModel(BaichuanPreTrainedModel, LlamaModel):
    """The decoder stack; forward is LlamaModel's."""

    def __init__(self, config: BaichuanConfig):
        _check_supported(config)
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class BaichuanForCausalLM(BaichuanPreTrainedModel, LlamaForCausalLM):
    """Baichuan-7B / Baichuan2-7B causal LM; forward and generation are LlamaForCausalLM's."""

    def __init__(self, config: BaichuanConfig):
        _check_supported(config)
        PreTrainedModel.__init__(self, config)
        self.model = BaichuanModel(config)
        self.vocab_size = config.vocab_size
        if config.norm_head:
            self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # post_init only after every module exists, so each one gets initialised.
        self.post_init()


# --- tokenizer ------------------------------------------------------------------------------


class BaichuanTokenizer(SentencePieceBackend):
    """Baichuan's SentencePiece tokenizer, tokenizing exactly like the original BaiChuanTokenizer.

    Plain text goes straight through `sp_model.encode(text, out_type=str)` (no dummy-prefix
    handling); `<s>`, `</s>` and `<unk>` written in the text are recognised as special tokens.
    `add_bos_token` / `add_eos_token` come from tokenizer_config.json and default to False, the
    originals' values. Without a configured pad token the unknown token (id 0) pads.

    Decoding runs each stretch of ordinary pieces through `sp_model.decode`, so spaces and
    byte-fallback pieces round-trip exactly; special and added tokens are inserted verbatim
    (unlike the original, no space is inserted before them, which keeps decode(encode(s)) == s).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: Any = "<unk>",
        bos_token: Any = "<s>",
        eos_token: Any = "</s>",
        pad_token: Any = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        sp_model_kwargs: dict[str, Any] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        # Must exist before the base init, which may already build inputs with special tokens.
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        if pad_token is None:
            pad_token = unk_token
        # The folder's auto_map names tokenization_baichuan.py, which we never ship; keeping it
        # would make save_pretrained write a reference to a missing file.
        kwargs.pop("auto_map", None)
        # legacy=False would rewrite the model proto and prefix "<unk>" hacks around spaces.
        kwargs["legacy"] = True
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=self.add_bos_token,
            add_eos_token=self.add_eos_token,
            sp_model_kwargs=sp_model_kwargs or {},
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out: list[str] = []
        pieces: list[str] = []
        verbatim = self._added_tokens_encoder
        for token in tokens:
            if token in verbatim:
                if pieces:
                    out.append(self.sp_model.decode(pieces))
                    pieces = []
                out.append(token)
            else:
                pieces.append(token)
        if pieces:
            out.append(self.sp_model.decode(pieces))
        return "".join(out)

    def _wrap(self, ids: list[int]) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + list(ids) + eos

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        out = self._wrap(token_ids_0)
        if token_ids_1 is not None:
            out += self._wrap(token_ids_1)
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(
                token_ids_0, token_ids_1, already_has_special_tokens=True
            )

        def mask(ids: list[int]) -> list[int]:
            return [1] * self.add_bos_token + [0] * len(ids) + [1] * self.add_eos_token

        return mask(token_ids_0) + (mask(token_ids_1) if token_ids_1 is not None else [])

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        first = len(self._wrap(token_ids_0))
        if token_ids_1 is None:
            return [0] * first
        return [0] * first + [1] * len(self._wrap(token_ids_1))

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers 5.x drops add_bos_token/add_eos_token from the saved tokenizer_config.json
        # (its fast tokenizers keep them in tokenizer.json); we have no tokenizer.json, so without
        # them a reload would silently fall back to the defaults.
        for path in files or ():
            if os.path.basename(str(path)).endswith("tokenizer_config.json"):
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                data["add_bos_token"] = self.add_bos_token
                data["add_eos_token"] = self.add_eos_token
                data.pop("auto_map", None)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


class BaiChuanTokenizer(BaichuanTokenizer):
    """The name Baichuan-7B's tokenizer_config.json uses (Baichuan2 spells it BaichuanTokenizer)."""


def load_baichuan_tokenizer(path: str | os.PathLike) -> BaichuanTokenizer:
    """Load the tokenizer of a Baichuan(2) folder, whatever its tokenizer_config.json names."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise UserError(
            f"No tokenizer.model in {path!r}: a Baichuan model folder needs its SentencePiece "
            "tokenizer file next to config.json."
        )
    name = None
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                name = json.load(f).get("tokenizer_class")
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot read {config_file}: {err}") from err
    cls = BaiChuanTokenizer if name == "BaiChuanTokenizer" else BaichuanTokenizer
    return cls.from_pretrained(path)


# --- conversion to plain Llama ----------------------------------------------------------------

_W_PACK = re.compile(r"^(.*)\.W_pack\.(weight|bias)$")


def split_w_pack(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Turn a Baichuan state dict into a LlamaForCausalLM one.

    `...self_attn.W_pack.{weight,bias}` becomes `q_proj/k_proj/v_proj`, the per-layer
    `rotary_emb.inv_freq` buffers are dropped, and when `config.norm_head` the lm_head rows are
    normalised (in float32, stored back in their dtype) so a plain Linear head computes the same
    logits. Key prefixes are preserved; other tensors pass through untouched.
    """
    hidden = _get(config, "hidden_size")
    norm_head = bool(_get(config, "norm_head", False))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        match = _W_PACK.match(key)
        if match:
            prefix, kind = match.groups()
            if tensor.shape[0] != 3 * hidden:
                raise ValueError(
                    f"{key} has {tensor.shape[0]} rows, expected 3 * hidden_size = {3 * hidden}"
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part.clone()
            continue
        if norm_head and key.endswith("lm_head.weight"):
            tensor = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        out[key] = tensor
    return out


def llama_config_from_baichuan(config: Any) -> LlamaConfig:
    """The LlamaConfig describing the same network as a Baichuan config (for plain-Llama export)."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(reason)
    dtype = _get(config, "dtype") or _get(config, "torch_dtype")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    rope = _get(config, "rope_parameters") or {}
    llama = LlamaConfig(
        vocab_size=_get(config, "vocab_size"),
        hidden_size=_get(config, "hidden_size"),
        intermediate_size=_get(config, "intermediate_size"),
        num_hidden_layers=_get(config, "num_hidden_layers"),
        num_attention_heads=_get(config, "num_attention_heads"),
        num_key_value_heads=_get(config, "num_attention_heads"),
        hidden_act=_get(config, "hidden_act", "silu"),
        max_position_embeddings=_get(config, "max_position_embeddings", 4096),
        initializer_range=_get(config, "initializer_range", 0.02),
        rms_norm_eps=_get(config, "rms_norm_eps", 1e-6),
        use_cache=_get(config, "use_cache", True),
        pad_token_id=_get(config, "pad_token_id", 0),
        bos_token_id=_get(config, "bos_token_id", 1),
        eos_token_id=_get(config, "eos_token_id", 2),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)},
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
    )
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def is_baichuan_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose config.json says model_type "baichuan"."""
    config_file = os.path.join(os.fspath(path), "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "baichuan"


# --- Auto* registration -----------------------------------------------------------------------

_registered = False


def register() -> None:
    """Map model_type "baichuan" and both tokenizer names to the classes above (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    # Registering the alias as the "slow" class makes its name resolvable from tokenizer_config.json
    # (Baichuan-7B names BaiChuanTokenizer) without making it the class AutoTokenizer builds.
    AutoTokenizer.register(
        BaichuanConfig,
        tokenizer_class=BaichuanTokenizer,
        slow_tokenizer_class=BaiChuanTokenizer,
        exist_ok=True,
    )
    _registered = True


register()
