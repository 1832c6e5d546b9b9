"""LoRA adapters from any source, and merging them into a plain model folder.

`attach_adapter` loads an adapter onto an already loaded base model (4-bit, 8-bit or 16-bit):
our own peft folders (adapter_model.safetensors) as well as the seed project's peft-0.3.0 era
folders (adapter_model.bin, a config with keys current peft no longer knows). Everything that
can be wrong with an adapter is checked against the base model *before* peft touches it, so a
bad adapter costs one clear UserError and leaves the base model as it was. Afterwards every
tensor of the file must have landed in a LoRA parameter and every LoRA parameter must have come
from the file: a silently ignored key would give a model that "works" but is not the adapter.

`merge_adapter` folds an adapter into a 16-bit copy of its base and writes a folder that stock
transformers loads without cnqlora and without remote code. Baichuan bases become plain LLaMA
(W_pack split into q/k/v, Baichuan2's NormHead folded into normalised head rows) with a
`tokenizer.json` that reproduces BaichuanTokenizer exactly (`baichuan_tokenizer_json`).
`check_merge` compares the merged folder with base + adapter; its tolerance is explained at
`TOLERANCES`.

`average_adapters` writes one adapter that is exactly the mean of several (seeds of one recipe,
say), without loading a model.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AVERAGE_MARKER",
    "MERGE_DTYPES",
    "MERGE_MARKER",
    "TOLERANCES",
    "AdapterFiles",
    "adapter_train_config",
    "attach_adapter",
    "average_adapters",
    "baichuan_tokenizer_json",
    "check_merge",
    "default_check_prompts",
    "merge_adapter",
    "read_adapter",
    "save_baichuan_fast_tokenizer",
    "train_config_columns",
    "trained_eos_token",
    "use_trained_eos",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_MARKER = "cnqlora_merge.json"
AVERAGE_MARKER = "cnqlora_average.json"

_logger = logging.getLogger(__name__)

# Tolerance of check_merge on max |logit difference|, as a fraction of the largest |logit| of the
# reference (at least 1.0, so near-zero logits do not make the bound vanish).
#
# A merged model computes (W + s·BA) x with W + s·BA rounded once to the storage dtype; base +
# adapter computes W x + s·B(A x) with the LoRA path in float32. The two differ only by rounding:
# - float32: reassociation error ~1e-7 relative per matmul; measured 4e-7 (2 layers) and 1e-6
#   (32 layers, hidden 512) of the logit scale, so 1e-4 is generous, and greedy tokens must agree
#   exactly.
# - bfloat16 keeps 8 significant bits: rounding W + s·BA moves each weight by up to 2^-9 of its
#   size (often as much as the LoRA delta itself), and every activation of both runs is rounded,
#   so the noise compounds with depth. Measured: 0.7% of the logit scale (2 layers) and 2%
#   (32 layers, an adapter whose delta is as large as W itself - far stronger than trained LoRA
#   deltas). 4% leaves 2x headroom, and still catches a merge that lost or doubled the adapter,
#   swapped q/k/v or kept an unnormalised NormHead: those move logits by about as much as the
#   adapter itself (tens of percent). An adapter so strong that it makes the network chaotic
#   fails even in float32 against 1e-4; merge_adapter's `tolerance` overrides the fraction.
# - float16 has 3 more mantissa bits than bfloat16, hence 8x tighter.
# Greedy tokens are compared with teacher forcing on the reference continuation, so both models
# always see the same inputs; in 16 bits a token whose argmax differs is accepted when the logits
# stay within the tolerance, i.e. it was a near tie that rounding may legitimately flip.
TOLERANCES = {"bfloat16": 4e-2, "float16": 5e-3, "float32": 1e-4}
# What a merge can be stored in is exactly what check_merge has a tolerance for; bfloat16 first,
# as the default.
MERGE_DTYPES = tuple(TOLERANCES)


# =========================================================================== reading adapters


@dataclass
class AdapterFiles:
    """An adapter folder read and checked on its own (no base model needed)."""

    path: str
    config: Any  # peft LoraConfig
    weights: dict[str, Any]  # file key -> tensor, as stored
    weights_file: str
    notes: list[str] = field(default_factory=list)


def _lora_config_fields() -> set[str]:
    import dataclasses

    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}


def _adapter_hint(path: str) -> str:
    nested = os.path.join(path, "adapter_model", ADAPTER_CONFIG_NAME)
    if os.path.isfile(nested):
        return f" This looks like a training run folder: the adapter is {os.path.join(path, 'adapter_model')}."
    return (" An adapter folder holds adapter_config.json and adapter_model.safetensors (or the older "
            "adapter_model.bin); training writes it to <output_dir>/<run_name>/adapter_model.")


def read_adapter(adapter_path: str) -> AdapterFiles:
    """Read an adapter folder: its LoRA config (unknown old keys dropped) and its weights.

    Needs no base model, so callers run it before loading one to fail fast. Adapters are small
    (tens of MB for a 7B model), so the weights are read too; pass the result to
    `attach_adapter` rather than reading the folder again. Whether the weights fit a particular
    base model is checked there.
    """
    path = os.fspath(adapter_path)
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "not found"
        raise UserError(f"{path}: adapter folder {what}.{_adapter_hint(path)}")
    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no {ADAPTER_CONFIG_NAME}, so this is not a LoRA adapter folder.{_adapter_hint(path)}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot be read as JSON ({e}); the file is damaged, copy it again.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object of LoRA settings.")
    peft_type = str(raw.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise UserError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, not 'LORA'; only LoRA adapters "
                        "(including QLoRA ones) can be loaded or merged.")

    known = _lora_config_fields()
    # peft_type is implied by the class; peft_version records the writer and is rewritten on save.
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "peft_version")}
    dropped = sorted(k for k in raw if k not in known)
    notes = []
    if dropped:
        notes.append(f"{config_path}: ignored setting(s) unknown to peft {_peft_version()}: {', '.join(dropped)} "
                     "(written by an older peft; they do not change the weights)")
    if raw.get("merge_weights"):
        # peft 0.3 could be asked to fold weights at eval time; the stored weights are still separate.
        notes.append(f"{config_path}: 'merge_weights: true' only affected peft 0.3's eval mode; the weights "
                     "in the file are unmerged and are loaded as such")
    if raw.get("enable_lora"):
        raise UserError(f"{config_path}: enable_lora={raw['enable_lora']!r} marks a peft 0.3 MergedLinear adapter "
                        "(LoRA on only some slices of a fused layer), which current peft cannot represent. "
                        "Retrain the adapter with this toolkit.")
    from peft import LoraConfig

    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_path}: invalid LoRA settings: {e}") from None
    if not config.target_modules and not getattr(config, "target_parameters", None):
        raise UserError(f"{config_path}: target_modules is empty; the adapter does not say which layers it adapts.")

    weights_file = next((os.path.join(path, n) for n in _WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))), None)
    if weights_file is None:
        raise UserError(f"{path}: has {ADAPTER_CONFIG_NAME} but no weights ({' or '.join(_WEIGHT_NAMES)}); the "
                        "adapter was not saved completely. Copy the weights file next to the config.")
    weights = _load_weights(weights_file)
    return AdapterFiles(path, config, weights, weights_file, notes)


def _peft_version() -> str:
    import peft

    return peft.__version__


def _load_weights(weights_file: str) -> dict[str, Any]:
    import torch

    if weights_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            weights = load_file(weights_file, device="cpu")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{weights_file}: not a readable safetensors file ({e}); copy it again.") from None
    else:
        try:
            weights = torch.load(weights_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only=True refuses every global that is not a tensor building block, so this
            # is a pickle that would have run other code (or at least built other objects).
            first = str(e).strip().splitlines()
            reason = next((line for line in first if "Unsupported" in line or "global" in line.lower()), "")
            raise UserError(
                f"{weights_file}: refused to load: the pickle contains Python objects other than tensors, and "
                "unpickling them could run arbitrary code. Only weights-only files are read. If the file comes "
                "from a source you trust, convert it to adapter_model.safetensors where it was made."
                + (f" (torch: {reason.strip()})" if reason else "")) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{weights_file}: not a readable PyTorch weights file ({e}); copy it again.") from None
    if not isinstance(weights, Mapping) or not weights:
        raise UserError(f"{weights_file}: expected a non-empty mapping of parameter names to tensors, found "
                        f"{type(weights).__name__}{' (empty)' if isinstance(weights, Mapping) else ''}.")
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{weights_file}: entry {bad[0]!r} is not a named tensor; this is not an adapter weights file.")
    return dict(weights)


# =========================================================================== attaching


@dataclass
class _Key:
    """Where one tensor of the adapter file goes."""

    file_key: str
    module: str  # path of the base-model module it belongs to, e.g. model.layers.0.self_attn.W_pack
    lora: str | None  # lora_A, lora_B, lora_embedding_A, ... or None for a non-LoRA tensor
    param: str  # weight / bias


_PREFIX = "base_model.model."


def _parse_key(key: str, adapter_names: set[str]) -> _Key:
    # peft writes keys without the adapter name (base_model.model.<module>.lora_A.weight), from
    # 0.3 until today; a state dict taken straight from a PeftModel has the name in the middle
    # (lora_A.default.weight). Both are accepted; the name, when present, is discarded.
    rest = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    parts = rest.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            tail = parts[i + 1:]
            if len(tail) == 2 and tail[0] in adapter_names | {"default"}:
                tail = tail[1:]
            return _Key(key, ".".join(parts[:i]), part, ".".join(tail) or "weight")
    return _Key(key, ".".join(parts[:-1]), None, parts[-1])


def _target_present(target: str, module_names: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for name in module_names)


def _describe_layers(model) -> str:
    from .models import linear_module_names

    names = linear_module_names(model)
    return ", ".join(names) if names else "(none found)"


def _check_targets(model, files: AdapterFiles, keys: list[_Key], module_names: list[str]) -> None:
    config = files.config
    targets = config.target_modules
    where = os.path.join(files.path, ADAPTER_CONFIG_NAME)
    model_type = getattr(getattr(model, "config", None), "model_type", "this model")
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in module_names):
            return
        raise UserError(f"{where}: target_modules pattern {targets!r} matches no layer of this base model "
                        f"({model_type}); its linear layers are {_describe_layers(model)}. The adapter was trained "
                        "for a different model: use that base model.")
    targets = list(targets or [])
    absent = sorted(t for t in targets if not _target_present(t, module_names))
    used = _leaf_names(keys)
    if not absent or (set(absent).isdisjoint(used) and len(absent) < len(targets)):
        if absent:
            files.notes.append(f"{where}: target(s) {', '.join(absent)} are not in this model and have no weights "
                               "in the file; ignored")
        return
    hint = ""
    if {"q_proj", "k_proj", "v_proj"} & set(absent) and _target_present("W_pack", module_names):
        hint = (" Baichuan has no q_proj/k_proj/v_proj: its q, k and v are one fused layer, W_pack, so this "
                "adapter was trained for another architecture (LLaMA, Qwen, ...) and cannot be applied to it.")
    trained_on = getattr(config, "base_model_name_or_path", None)
    raise UserError(f"{where}: the adapter targets {', '.join(absent)}, which this base model ({model_type}) does "
                    f"not have; its linear layers are {_describe_layers(model)}.{hint} Load the base model the "
                    f"adapter was trained on{f' ({trained_on})' if trained_on else ''}.")


def _expected_rank(config) -> int | None:
    # rank_pattern overrides r for matching modules; when one is present, the per-module rank is
    # left to the exact comparison with peft's own parameters after injection.
    if getattr(config, "rank_pattern", None):
        return None
    return int(config.r)


def _check_shapes(model, files: AdapterFiles, keys: list[_Key], modules: dict[str, Any]) -> None:
    import torch

    config = files.config
    trained_on = getattr(config, "base_model_name_or_path", None)
    advice = (" The adapter was trained on a model of another size (different hidden or layer sizes); load the base "
              f"model it was trained on{f' ({trained_on})' if trained_on else ''}.")
    rank = _expected_rank(config)
    for key in keys:
        if key.lora is None or key.param != "weight":
            continue
        tensor = files.weights[key.file_key]
        module = modules[key.module]
        shape = tuple(tensor.shape)
        if isinstance(module, torch.nn.Embedding):
            n_in, n_out, a_name, b_name = module.num_embeddings, module.embedding_dim, "lora_embedding_A", "lora_embedding_B"
            layer = f"Embedding({n_in}, {n_out})"
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            n_in, n_out, a_name, b_name = module.in_features, module.out_features, "lora_A", "lora_B"
            layer = f"Linear(in_features={n_in}, out_features={n_out})"
        else:
            continue
        is_a = key.lora == a_name
        if not is_a and key.lora != b_name:
            continue
        file_rank = (shape[0] if is_a else shape[-1]) if len(shape) == 2 else 0
        r = rank if rank is not None else file_rank
        expected = (r, n_in) if is_a else (n_out, r)
        if shape == expected:
            continue
        fits_layer = len(shape) == 2 and (shape[1] == n_in if is_a else shape[0] == n_out)
        if fits_layer and rank is not None:
            why = (f"Its rank {file_rank} differs from r={rank} in {ADAPTER_CONFIG_NAME}, so the folder mixes the "
                   "files of two adapters.")
        else:
            why = advice.strip()
        raise UserError(f"{files.weights_file}: {key.file_key} has shape {_fmt(shape)}, but this base model's "
                        f"{key.module} is {layer}, which needs {_fmt(expected)}. {why}")


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _plan(model, files: AdapterFiles, adapter_name: str) -> list[_Key]:
    modules = dict(model.named_modules())
    names = list(modules)
    keys = [_parse_key(k, {adapter_name}) for k in files.weights]
    _check_targets(model, files, keys, names)
    missing = [k for k in keys if k.module not in modules]
    if missing:
        first = missing[0]
        layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n + "."))})
        depth = f" (this base model has {len(layers)} layers, numbered 0-{layers[-1]})" if layers else ""
        raise UserError(f"{files.weights_file}: {len(missing)} of {len(keys)} tensors belong to no layer of this "
                        f"base model, e.g. {first.file_key} (no module {first.module}{depth}). The adapter was "
                        "trained on a different model; load the base model it was trained on.")
    _check_shapes(model, files, keys, modules)
    return keys


def _destination(key: _Key, adapter_name: str, params: dict[str, Any]) -> str | None:
    base = f"base_model.model.{key.module}"
    if key.lora is not None:
        candidates = [f"{base}.{key.lora}.{adapter_name}.{key.param}"]
    else:
        # Whole modules trained alongside LoRA (modules_to_save) live in a wrapper's copy; biases
        # trained with bias="all"/"lora_only" live on the wrapped base layer.
        candidates = [f"{base}.modules_to_save.{adapter_name}.{key.param}", f"{base}.base_layer.{key.param}",
                      f"{base}.{key.param}"]
    return next((c for c in candidates if c in params), None)


def attach_adapter(model, adapter: str | AdapterFiles, is_trainable: bool = False, adapter_name: str = "default",
                   log: Callable[[str], None] | None = None):
    """Load a LoRA adapter (current or peft-0.3 era folder) onto a loaded base model; return the PeftModel.

    `adapter` is the folder, or what `read_adapter` already read from it (used up here: its config
    and notes are updated).

    The model is checked against the adapter first (target layers exist, shapes fit, every tensor
    has a home), so a wrong adapter raises UserError with the base model left untouched. Notes
    about the file (old config keys that were dropped, ...) go to `log` and to `.cnqlora_notes`
    of the returned model. It is in eval mode with frozen LoRA weights unless `is_trainable`.
    """
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel

    emit = log or _logger.info
    adapter_path = adapter.path if isinstance(adapter, AdapterFiles) else adapter
    if isinstance(model, PeftModel):
        raise UserError(f"{adapter_path}: the model already carries an adapter; attach to the plain base model "
                        "(or merge the first adapter before loading another).")
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter)
    keys = _plan(model, files, adapter_name)

    config = files.config
    config.inference_mode = not is_trainable
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(config.task_type or ""), PeftModel)
    try:
        peft_model = cls(model, config, adapter_name=adapter_name)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{adapter_path}: peft cannot attach this adapter to the model: {e}") from None

    try:
        _copy_weights(peft_model, files, keys, adapter_name)
    except BaseException:
        # Undo the injection so the caller's base model is usable as it was.
        try:
            peft_model.unload()
        except Exception:  # noqa: BLE001 - best effort; the original error matters more
            pass
        raise

    for name, param in peft_model.named_parameters():
        if f".{adapter_name}." in f"{name}.":
            param.requires_grad_(is_trainable)
    peft_model.train(is_trainable)
    for note in files.notes:
        emit(note)
    emit(f"adapter {files.path}: {len(keys)} tensors loaded from {os.path.basename(files.weights_file)} "
         f"(LoRA r={config.r}, alpha={config.lora_alpha}, on {', '.join(sorted(_leaf_names(keys)))})")
    peft_model.cnqlora_notes = list(files.notes)
    return peft_model


def _leaf_names(keys: list[_Key]) -> set[str]:
    return {k.module.rsplit(".", 1)[-1] for k in keys}


def _copy_weights(peft_model, files: AdapterFiles, keys: list[_Key], adapter_name: str) -> None:
    import torch

    params = dict(peft_model.named_parameters())
    filled = set()
    for key in keys:
        dest = _destination(key, adapter_name, params)
        if dest is None:
            raise UserError(f"{files.weights_file}: {key.file_key} matches no adapter parameter of the model peft "
                            f"built from {ADAPTER_CONFIG_NAME} (is {key.module} listed in target_modules or "
                            "modules_to_save?). The config and the weights do not belong together.")
        param = params[dest]
        tensor = files.weights[key.file_key]
        if tuple(param.shape) != tuple(tensor.shape):
            raise UserError(f"{files.weights_file}: {key.file_key} has shape {_fmt(tuple(tensor.shape))} but the "
                            f"adapter config makes {dest} {_fmt(tuple(param.shape))}; check r / rank_pattern in "
                            f"{ADAPTER_CONFIG_NAME}.")
        with torch.no_grad():
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        filled.add(dest)
    # LoRA parameters the file did not provide would keep their random (A) / zero (B)
    # initialisation: the model would run, silently without part of the adapter.
    marker = f".{adapter_name}."
    unfilled = sorted(n for n in params if marker in n and ("lora_" in n or ".modules_to_save." in n)
                      and n not in filled)
    if unfilled:
        raise UserError(f"{files.weights_file}: has no weights for {len(unfilled)} adapter parameter(s) that "
                        f"{ADAPTER_CONFIG_NAME} asks for, e.g. {unfilled[0].replace(marker, '.')}. The adapter was "
                        "trained on a model with fewer layers or other target modules, or the file is incomplete.")


# =========================================================================== tokenizer.json


def baichuan_tokenizer_json(sp_model_path: str):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like BaichuanTokenizer.

    SentencePiece BPE is ported as: the whole normalised text is one "word" (SentencePiece does
    not pre-split at encode time); " " becomes "▁" and nothing is prepended (no dummy prefix);
    merges are every (left, right) pair of normal pieces whose concatenation is a normal piece,
    ranked by that piece's score (SentencePiece merges the best-scoring pair first); characters
    outside the vocabulary fall back to <0xNN> byte pieces. <unk>/<s>/</s> (and any other
    control piece) are special tokens recognised in text, as BaichuanTokenizer does; user-defined
    pieces (our tiny models' "\\n") are matched before BPE, as SentencePiece does.

    One difference remains, in decoding only: a run of byte pieces that is not valid UTF-8 (which
    encoding never produces; only a model's sampling can) becomes one U+FFFD per byte here, while
    SentencePiece keeps the run's valid bytes. tokenizers has no decoder that does the latter.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    try:
        with open(sp_model_path, "rb") as f:
            proto = sp_pb2.ModelProto()
            proto.ParseFromString(f.read())
    except Exception as e:  # OSError, or protobuf's DecodeError (which has no stable import path)
        raise UserError(f"{sp_model_path}: not a readable SentencePiece model ({e}).") from None
    normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
    unsupported = []
    if trainer.model_type != sp_pb2.TrainerSpec.BPE:
        unsupported.append(f"model_type {sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} (only BPE)")
    if normalizer.add_dummy_prefix:
        unsupported.append("add_dummy_prefix")
    if normalizer.remove_extra_whitespaces:
        unsupported.append("remove_extra_whitespaces")
    if normalizer.precompiled_charsmap:
        unsupported.append(f"normalization rule {normalizer.name!r}")
    if trainer.treat_whitespace_as_suffix:
        unsupported.append("treat_whitespace_as_suffix")
    if unsupported:
        raise UserError(f"{sp_model_path}: cannot convert this SentencePiece model to tokenizer.json: it uses "
                        f"{', '.join(unsupported)}, while Baichuan's tokenizers use plain BPE with identity "
                        "normalisation and no dummy prefix.")

    Piece = sp_pb2.ModelProto.SentencePiece
    vocab: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        vocab.setdefault(piece.piece, i)
    mergeable = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = []
    for piece, (score, pid) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append(((-score, pid, mergeable[left][1], mergeable[right][1]), (left, right)))
    ranked.sort(key=lambda item: item[0])
    merges = [pair for _, pair in ranked]

    unk = proto.pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(proto.pieces) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=bool(trainer.byte_fallback)))
    tokenizer.normalizer = normalizers.Replace(" ", "▁") if normalizer.escape_whitespaces else None
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [p.piece for p in proto.pieces if p.type in (Piece.UNKNOWN, Piece.CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    user = [p.piece for p in proto.pieces if p.type == Piece.USER_DEFINED]
    if user:
        # SentencePiece matches them on the normalised text, hence normalized=True.
        tokenizer.add_tokens([AddedToken(s, special=False, normalized=True) for s in user])
    return tokenizer


def save_baichuan_fast_tokenizer(base_tokenizer, sp_model_path: str, out_dir: str, model_max_length: int | None = None):
    """Write tokenizer.json + tokenizer_config.json (+ the original tokenizer.model) for stock AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=baichuan_tokenizer_json(sp_model_path),
        bos_token=base_tokenizer.bos_token,
        eos_token=base_tokenizer.eos_token,
        unk_token=base_tokenizer.unk_token,
        pad_token=base_tokenizer.pad_token or base_tokenizer.unk_token,
        add_bos_token=bool(getattr(base_tokenizer, "add_bos_token", False)),
        add_eos_token=bool(getattr(base_tokenizer, "add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or base_tokenizer.model_max_length,
    )
    fast.save_pretrained(out_dir)
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    # transformers 5 writes its internal class name; the generic name loads the same tokenizer.json
    # there and in transformers 4. The flags are spelled out as the original tokenizer_config had
    # them, so nothing falls back to a class default.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = bool(getattr(base_tokenizer, "add_bos_token", False))
    config["add_eos_token"] = bool(getattr(base_tokenizer, "add_eos_token", False))
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    # Kept for reference and for tools that want the SentencePiece model; tokenizer.json wins
    # for AutoTokenizer because tokenizer_config.json names the generic fast class.
    shutil.copyfile(sp_model_path, os.path.join(out_dir, "tokenizer.model"))
    return fast


# =========================================================================== merging


def _check_out_dir(out_dir: str, marker: str = MERGE_MARKER, what: str = "merge") -> bool:
    """True when out_dir holds a previous output of ours (`marker` in it) that may be replaced."""
    if not os.path.exists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not a folder; choose another output folder.")
    entries = os.listdir(out_dir)
    if not entries:
        return False
    if marker in entries:
        return True
    raise UserError(f"{out_dir}: exists and is not empty, and is not a previous {what} (no {marker} in it); "
                    "refusing to overwrite it. Choose another output folder, or remove this one yourself.")


def _save_safetensors(state: dict[str, Any], out_dir: str, max_shard_size: str = "5GB") -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, os.path.join(out_dir, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return sorted(split.filename_to_tensors)


def _write_baichuan_as_llama(merged, tokenizer, base_path: str, out_dir: str, dtype: str) -> None:
    from .baichuan import llama_config_from_baichuan, split_w_pack

    state = split_w_pack(merged.state_dict(), merged.config)
    config = llama_config_from_baichuan(merged.config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    _save_safetensors(state, out_dir)
    merged.generation_config.save_pretrained(out_dir)
    save_baichuan_fast_tokenizer(tokenizer, os.path.join(base_path, "tokenizer.model"), out_dir,
                                 model_max_length=getattr(merged.config, "max_position_embeddings", None))


def merge_adapter(base_path: str, adapter_path: str, out_dir: str, dtype: str = "bfloat16",
                  trust_remote_code: bool = False, log: Callable[[str], None] = print, *,
                  device: str = "cpu", prompts: list[str] | None = None, max_new_tokens: int = 16,
                  tolerance: float | None = None) -> str:
    """Fold a LoRA adapter into a 16-bit (or float32) copy of its base; write a plain model folder.

    The folder loads with stock AutoModelForCausalLM / AutoTokenizer (no cnqlora, no remote code):
    Baichuan bases are written as LLaMA with a tokenizer.json. It is written to a temporary folder
    next to out_dir and renamed only after `check_merge`'s comparison with base + adapter passed
    (on `prompts`, default: `default_check_prompts`; `tolerance` overrides TOLERANCES[dtype]);
    an existing non-empty out_dir is replaced only when it holds a previous merge (MERGE_MARKER).
    """
    from .models import check_model_folder
    from .runs import atomic_dir

    if dtype not in MERGE_DTYPES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)} (the merged weights are stored "
                        "unquantised; a 4-bit base is merged from its 16-bit original).")
    # A trailing slash would put atomic_dir's temporary folder inside out_dir.
    out_dir = os.path.normpath(out_dir)
    replacing = _check_out_dir(out_dir)
    base_config = check_model_folder(base_path, need_tokenizer=True, trust_remote_code=trust_remote_code)
    adapter = read_adapter(adapter_path)  # fail on a bad adapter before spending minutes loading the base
    started = time.time()
    tokenizer, peft_model, reference = _base_with_adapter(
        base_path, adapter, prompts, max_new_tokens, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, log=log, model_type=base_config.get("model_type"))

    merged = peft_model.merge_and_unload()
    # Also what the LLaMA config written for a Baichuan base inherits.
    merged.config.use_cache = True
    del peft_model, adapter
    with atomic_dir(out_dir) as tmp:
        if base_config.get("model_type") == "baichuan":
            _write_baichuan_as_llama(merged, tokenizer, base_path, tmp, dtype)
            layout = "plain LLaMA (W_pack split into q/k/v_proj" + (
                ", NormHead folded into the head)" if getattr(merged.config, "norm_head", False) else ")")
        else:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            layout = type(merged).__name__
        del merged
        gc.collect()
        result = _compare_with_merged(tmp, reference, tokenizer, dtype, device, tolerance)
        marker = {"base_model": os.path.abspath(base_path), "adapter": os.path.abspath(adapter_path),
                  "dtype": dtype, "layout": layout, "check": result}
        with open(os.path.join(tmp, MERGE_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, ensure_ascii=False)
            f.write("\n")
        log(describe_check(result))
        if not result["ok"]:
            raise UserError(f"{out_dir}: the merged model does not reproduce base + adapter: {describe_check(result)}. "
                            "Nothing was written. Merge with dtype float32 to see whether 16-bit rounding is the cause (see "
                            "cnqlora.adapters.TOLERANCES for what the tolerance allows and why).")
    log(f"{'replaced the previous merge in' if replacing else 'wrote'} {out_dir}: {layout}, {dtype}, "
        f"in {time.time() - started:.1f}s")
    return out_dir


# =========================================================================== averaging adapters

# LoRA tensors whose rank is their first axis (A: r x in) and those whose rank is their last (B: out x r).
_RANK_FIRST = ("lora_A", "lora_embedding_A")
_RANK_LAST = ("lora_B", "lora_embedding_B")


def _scaling(config) -> float:
    """peft's factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)


def _check_averageable(adapters: list[AdapterFiles], eos_tokens: list[str | None]) -> None:
    first = adapters[0]
    for adapter in adapters:
        config, where = adapter.config, os.path.join(adapter.path, ADAPTER_CONFIG_NAME)
        # One alpha and one r per adapter is what makes the concatenation below exact.
        if config.rank_pattern or config.alpha_pattern:
            raise UserError(f"{where}: rank_pattern/alpha_pattern give layers their own rank or alpha, which "
                            "averaging does not handle; average adapters trained with one r and one lora_alpha.")
        if getattr(config, "use_dora", False):
            raise UserError(f"{where}: a DoRA adapter (use_dora) rescales the whole weight, so it is not a sum of "
                            "low-rank deltas and cannot be averaged exactly.")
        if getattr(config, "lora_bias", False):
            raise UserError(f"{where}: lora_bias adapters are not supported for averaging.")
        if sorted(adapter.weights) != sorted(first.weights):
            only_here = sorted(set(adapter.weights) - set(first.weights))
            only_there = sorted(set(first.weights) - set(adapter.weights))
            example = (only_here or only_there)[0]
            raise UserError(f"{adapter.weights_file}: does not adapt the same layers as {first.weights_file} "
                            f"({example!r} is in only one of them); average adapters trained with the same "
                            "lora_target on the same base model.")
        for key, tensor in adapter.weights.items():
            lora = _parse_key(key, set()).lora
            if lora is not None and lora not in _RANK_FIRST + _RANK_LAST:
                raise UserError(f"{adapter.weights_file}: {key!r} is a {lora} tensor; only LoRA A/B pairs can be "
                                "averaged.")
            ref = first.weights[key]
            fixed = slice(None) if lora is None else slice(1, None) if lora in _RANK_FIRST else slice(None, -1)
            if tensor.shape[fixed] != ref.shape[fixed]:
                raise UserError(f"{adapter.weights_file}: {key!r} has shape {_fmt(tuple(tensor.shape))}, "
                                f"{first.weights_file} {_fmt(tuple(ref.shape))}: the adapters were trained on "
                                "different base models.")
    # a training checkpoint has no tokenizer beside it, so no EOS to disagree with
    eos = set(eos_tokens) - {None}
    if len(eos) > 1:
        raise UserError(f"the adapters were trained to end answers with different EOS tokens "
                        f"({', '.join(sorted(map(repr, eos)))}): they were trained with different tokenizers, "
                        "so their average would not know where to stop. Average adapters of one base model folder.")


def _averaged_weights(adapters: list[AdapterFiles]) -> dict[str, Any]:
    import torch

    k = len(adapters)
    out = {}
    for key in adapters[0].weights:
        lora = _parse_key(key, set()).lora
        tensors = [a.weights[key].float() for a in adapters]
        if lora in _RANK_FIRST:
            out[key] = torch.cat(tensors, dim=0)
        elif lora in _RANK_LAST:
            # each adapter's own scale and the 1/k of the mean go into its B block, so the
            # written adapter needs a scale of exactly 1 (lora_alpha = r)
            out[key] = torch.cat([t * (_scaling(a.config) / k) for t, a in zip(tensors, adapters)], dim=-1)
        else:  # a fully trained module (modules_to_save): the plain mean
            out[key] = sum(tensors) / k
    return out


def _delta(weights: Mapping[str, Any], a_key: str, scale: float):
    b_key = a_key.replace("lora_embedding_A", "lora_embedding_B").replace("lora_A", "lora_B")
    return scale * (weights[b_key].float() @ weights[a_key].float())


def _check_average(adapters: list[AdapterFiles], averaged: AdapterFiles) -> float:
    """Largest |difference| between the written adapter's B @ A deltas and the mean of the
    inputs' deltas, relative to the largest |mean delta|: only float rounding should remain."""
    worst = 0.0
    scale = _scaling(averaged.config)
    for key in averaged.weights:
        if _parse_key(key, set()).lora not in _RANK_FIRST:
            continue
        expected = sum(_delta(a.weights, key, _scaling(a.config)) for a in adapters) / len(adapters)
        got = _delta(averaged.weights, key, scale)
        size = float(expected.abs().max())
        worst = max(worst, float((got - expected).abs().max()) / max(size, 1e-12))
    return worst


# float32 sums of r products, reassociated: 3.2e-7 of the largest delta entry on real 0.5B adapters.
AVERAGE_TOLERANCE = 1e-5


def average_adapters(adapter_paths: list[str], out_dir: str, log: Callable[[str], None] = print) -> str:
    """Write the adapter whose weight change is the mean of the given adapters' (a LoRA "soup").

    Adapters of one base model trained with different seeds (or checkpoints of one run) differ
    in their A and B, so averaging A and B separately would not average the models. Instead the
    result stacks them: rank = the sum of their ranks, A = [A_1; ...; A_k], B = [s_1 B_1 | ... |
    s_k B_k] / k with s_i each adapter's own scale, and lora_alpha = rank so that peft's scale is
    1. Then B @ A = (1/k) sum of s_i B_i A_i exactly, and the result loads, predicts and merges
    like any adapter (merged, it costs nothing at inference). Weights are written in float32.
    No base model is needed; the written deltas are checked against the mean of the inputs'.
    """
    from .runs import atomic_dir

    if len(adapter_paths) < 2:
        raise UserError("averaging needs at least two adapter folders (comma-separated).")
    out_dir = os.path.normpath(out_dir)
    sources = [os.path.abspath(p) for p in adapter_paths]
    if os.path.abspath(out_dir) in sources:
        raise UserError(f"{out_dir}: is one of the adapters being averaged; write the average to another folder.")
    replacing = _check_out_dir(out_dir, AVERAGE_MARKER, "average")
    started = time.time()
    adapters = [read_adapter(p) for p in adapter_paths]
    for adapter in adapters:
        for note in adapter.notes:
            log(f"note: {note}")
    eos_tokens = [trained_eos_token(a.path) for a in adapters]
    _check_averageable(adapters, eos_tokens)
    weights = _averaged_weights(adapters)
    rank = sum(a.config.r for a in adapters)
    with open(os.path.join(adapters[0].path, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    config.update(r=rank, lora_alpha=rank, use_rslora=False)
    with atomic_dir(out_dir) as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        # the tokenizer (with the EOS the adapters were trained to write), chat template and training
        # config go along, so predict.py finds the same defaults as for each input adapter; from
        # the first adapter that has a tokenizer (a training checkpoint has none)
        donor = next((a.path for a, eos in zip(adapters, eos_tokens) if eos is not None), adapters[0].path)
        for name in sorted(os.listdir(donor)):
            source = os.path.join(donor, name)
            if (os.path.isfile(source) and name not in (ADAPTER_CONFIG_NAME, *_WEIGHT_NAMES, "README.md",
                                                        "dev_metrics.json", MERGE_MARKER, AVERAGE_MARKER)):
                shutil.copy2(source, os.path.join(tmp, name))
        worst = _check_average(adapters, read_adapter(tmp))
        if worst > AVERAGE_TOLERANCE:
            raise UserError(f"{out_dir}: the written adapter's deltas differ from the mean of the inputs' by "
                            f"{worst:.2e} of their size (tolerance {AVERAGE_TOLERANCE:.0e}); nothing was written.")
        marker = {"adapters": sources, "ranks": [a.config.r for a in adapters],
                  "scales": [_scaling(a.config) for a in adapters], "weight_each": 1 / len(adapters),
                  "rank": rank, "check_max_relative_difference": worst}
        with open(os.path.join(tmp, AVERAGE_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, ensure_ascii=False)
            f.write("\n")
    log(f"{'replaced the previous average in' if replacing else 'wrote'} {out_dir}: the mean of {len(adapters)} "
        f"adapters as one of rank {rank} (deltas within {worst:.1e} of the mean) in {time.time() - started:.1f}s")
    return out_dir


# =========================================================================== checking a merge


def _base_with_adapter(base_path: str, adapter: str | AdapterFiles, prompts: list | None, max_new_tokens: int, *,
                       dtype: str, device: str, trust_remote_code: bool, log: Callable[[str], None],
                       model_type: str | None = None) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(tokenizer, base + adapter, its `_reference_outputs` on `prompts`): what a merge must reproduce.

    `prompts` None: `default_check_prompts` (which needs the tokenizer, hence here).
    """
    from .models import ModelArgs, load_model, load_tokenizer

    started = time.time()
    adapter_path = adapter.path if isinstance(adapter, AdapterFiles) else adapter
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    # 16-bit, never quantised: merging into a dequantised 4-bit copy would bake the quantisation
    # error into every weight of the published model.
    model = load_model(ModelArgs(model_name_or_path=base_path, quantization="none", compute_dtype=dtype,
                                 device=device, trust_remote_code=trust_remote_code), device)
    peft_model = attach_adapter(model, adapter, log=log)
    # before the reference outputs, and saved with the merge: the merged folder must stop where the adapter does
    use_trained_eos(tokenizer, peft_model, adapter_path, log)
    log(f"loaded {base_path} ({dtype}) and the adapter in {time.time() - started:.1f}s")
    if prompts is None:
        prompts = default_check_prompts(adapter_path, tokenizer, model_type)
    return tokenizer, peft_model, _reference_outputs(peft_model, tokenizer, prompts, max_new_tokens)


def trained_eos_token(adapter_path: str) -> str | None:
    """The EOS token that training appended to every answer: the eos_token of the
    tokenizer_config.json that training saves beside the adapter. None when there is none to read."""
    try:
        with open(os.path.join(adapter_path, "tokenizer_config.json"), encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # AddedToken, as older transformers wrote it
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def use_trained_eos(tokenizer, model, adapter_path: str, log: Callable[[str], None] = print) -> None:
    """Make `tokenizer` end answers with the EOS the adapter was trained to write, and keep the
    base's own EOS as a stop token on `model.generation_config` as well.

    Two conversions of one base can name different EOS tokens: Qwen2.5's GGUF read by
    transformers 5.17 says <|endoftext|>, by 5.24 <|im_end|>. An adapter served with the other
    one never stops: it writes its own EOS, which generate() does not stop at and decoding skips
    as a special token, then starts its answer again until max_new_tokens (48 of the first 60
    MSRA test answers unparseable, against none with its own EOS).
    """
    eos = trained_eos_token(adapter_path)
    if eos is None or eos == tokenizer.eos_token:
        return
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if eos_id is None or (eos_id == tokenizer.unk_token_id and eos != tokenizer.unk_token):
        log(f"warning: {adapter_path} was trained to end answers with {eos!r}, which the base tokenizer does not "
            "know; answers may run on to max_new_tokens. Load the base with the tokenizer the adapter was trained with "
            "(predict.py --tokenizer_path).")
        return
    base_eos, base_eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    tokenizer.eos_token = eos
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        current = generation_config.eos_token_id
        ids = list(current) if isinstance(current, (list, tuple)) else [] if current is None else [current]
        if base_eos_id is not None:
            ids.append(base_eos_id)
        generation_config.eos_token_id = list(dict.fromkeys([eos_id, *ids]))
    log(f"note: the adapter was trained to end answers with {eos!r} (id {eos_id}), the base tokenizer with "
        f"{base_eos!r}; answers end at either")


def adapter_train_config(adapter_path: str) -> dict[str, Any]:
    """The adapter's train_config.yaml (written by training), or {} when it is missing or unreadable.

    It only supplies defaults (template, columns, data files), so a damaged copy must not stop
    the work it would have helped.
    """
    config_file = os.path.join(adapter_path, "train_config.yaml")
    if not os.path.isfile(config_file):
        return {}
    import yaml

    try:
        with open(config_file, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def train_config_columns(settings: Mapping[str, Any]):
    """The data columns a training config names (`data.Columns`), defaults for those it leaves out."""
    from .data import Columns

    return Columns(settings.get("instruct_column") or "instruct", settings.get("query_column") or "query",
                   settings.get("answer_column") or "answer")


def default_check_prompts(adapter_path: str, tokenizer, model_type: str | None,
                          n: int = 2) -> list[tuple[str, list[int]]]:
    """A few prompts in the adapter's own training format (train_config.yaml), else generic ones.

    Each is (its text, the ids encode_prompt gives it): the model sees exactly what it was
    trained on, and the text checks that the merged folder's tokenizer gives the same ids.
    """
    from .data import encode_prompt, read_records, resolve_template

    settings = adapter_train_config(adapter_path)
    try:
        template = resolve_template(str(settings.get("template") or "auto"), tokenizer, model_type)
    except UserError:
        template = "alpaca"
    records: list[dict[str, str]] = []
    columns = train_config_columns(settings)
    for key in ("dev_file", "train_file"):
        data_file = settings.get(key)
        if len(records) < n and isinstance(data_file, str) and os.path.isfile(data_file):
            try:
                records += read_records(data_file, columns, require_answer=False).records[: n - len(records)]
            except (UserError, OSError):
                pass
    generic = [{"instruct": "找出下面句子中的人名、地名和机构名。", "query": "王小明在北京大学读书，后来去了上海。"},
               {"instruct": "Describe the weather today in one sentence.", "query": ""}]
    records += generic[: max(0, n - len(records))]
    prompts = []
    for r in records:
        instruct, query = r.get("instruct", ""), r.get("query", "") or ""
        prompts.append(("\n".join(filter(None, (instruct, query))),
                        encode_prompt(tokenizer, template, instruct, query).ids))
    return prompts


def _prompt_ids(tokenizer, prompt: str | tuple[str, list[int]]) -> tuple[str, list[int], list[int]]:
    """(text, ids of the text alone, ids fed to the model) of a check prompt.

    A plain string is fed as BOS + text, as the plain templates start; a (text, ids) pair from
    default_check_prompts is fed as its ids.
    """
    from .data import encode_text

    text, ids = prompt if isinstance(prompt, tuple) else (prompt, encode_text(tokenizer, prompt))
    return text, list(tokenizer.encode(text, add_special_tokens=False)), list(ids)


def _greedy(model, ids: list[int], max_new_tokens: int, eos: Any) -> list[int]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else 0)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
    return out[0, len(ids):].tolist()


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def _reference_outputs(model, tokenizer, prompts: list, max_new_tokens: int) -> list[dict[str, Any]]:
    model.eval()
    eos = tokenizer.eos_token_id
    out = []
    for item in prompts:
        prompt, text_ids, ids = _prompt_ids(tokenizer, item)
        generated = _greedy(model, ids, max_new_tokens, eos)
        logits = _logits(model, ids + generated)
        # How far the adapter moves the base: a merge error is only meaningful next to this.
        with model.disable_adapter():
            effect = float((_logits(model, ids + generated) - logits).abs().max())
        out.append({"prompt": prompt, "text_ids": text_ids, "ids": ids, "generated": generated,
                    "logits": logits, "adapter_effect": effect})
    return out


def _compare_with_merged(merged_dir: str, reference: list[dict[str, Any]], base_tokenizer, dtype: str,
                         device: str, tolerance: float | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype),
                                                  device_map={"": device}).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    tolerance = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    eos = base_tokenizer.eos_token_id
    max_diff, scale = 0.0, 1.0
    agree, tokenizer_ok, flips, details = 0, True, 0, []
    for ref in reference:
        tokenizer_ok &= merged_tokenizer.encode(ref["prompt"], add_special_tokens=False) == ref["text_ids"]
        generated = _greedy(merged, ref["ids"], len(ref["generated"]) or 1, eos)[: len(ref["generated"])]
        logits = _logits(merged, ref["ids"] + ref["generated"])
        diff = float((logits - ref["logits"]).abs().max())
        max_diff = max(max_diff, diff)
        scale = max(scale, float(ref["logits"].abs().max()))
        # Teacher-forced argmax flips at the positions that produced the reference continuation.
        start = len(ref["ids"]) - 1
        positions = slice(start, start + len(ref["generated"]))
        flips += int((logits[positions].argmax(-1) != ref["logits"][positions].argmax(-1)).sum())
        agree += generated == ref["generated"]
        details.append({"prompt": ref["prompt"][-60:], "reference": ref["generated"], "merged": generated,
                        "max_abs_logit_diff": diff})
    del merged
    gc.collect()
    bound = tolerance * scale
    exact = dtype == "float32"
    ok = tokenizer_ok and max_diff <= bound and (not exact or (agree == len(reference) and flips == 0))
    return {"ok": bool(ok), "dtype": dtype, "prompts": len(reference), "greedy_agree": agree,
            "teacher_forced_flips": flips, "max_abs_logit_diff": max_diff, "logit_scale": scale,
            "adapter_effect": max(r["adapter_effect"] for r in reference) if reference else 0.0,
            "tolerance": bound, "relative_tolerance": tolerance, "tokenizer_agrees": bool(tokenizer_ok),
            "details": details}


def describe_check(result: dict[str, Any]) -> str:
    verdict = "passed" if result["ok"] else "FAILED"
    text = (f"merge check {verdict}: greedy outputs agree on {result['greedy_agree']}/{result['prompts']} prompts "
            f"({result['teacher_forced_flips']} teacher-forced argmax flips), max |logit diff| "
            f"{result['max_abs_logit_diff']:.3g} (tolerance {result['tolerance']:.3g} = "
            f"{result['relative_tolerance']:g} x logit scale {result['logit_scale']:.3g}, {result['dtype']})")
    if result["adapter_effect"] <= result["tolerance"]:
        text += (f"; note: the adapter itself moves the logits by only {result['adapter_effect']:.3g}, within the "
                 "tolerance, so this check cannot tell a merged model from the bare base")
    else:
        text += f"; the adapter moves the base's logits by up to {result['adapter_effect']:.3g}"
    if not result["tokenizer_agrees"]:
        text += "; the merged tokenizer gives different ids than the base tokenizer"
    return text


def check_merge(base_path: str, adapter_path: str, merged_dir: str, prompts: list[str], max_new_tokens: int = 16,
                *, dtype: str | None = None, device: str = "cpu", trust_remote_code: bool = False,
                tolerance: float | None = None) -> dict[str, Any]:
    """Compare a merged folder (loaded with plain transformers) with base (16-bit) + adapter.

    Both run in `dtype` (default: the merged folder's). Returns greedy agreement, teacher-forced
    argmax flips, max |logit diff| and whether it is within `TOLERANCES` (see there for why);
    "ok" also requires the merged tokenizer to give the base tokenizer's ids for each prompt.
    """
    from .models import _read_json

    if dtype is None:
        saved = _read_json(os.path.join(merged_dir, "config.json"))
        dtype = str(saved.get("dtype") or saved.get("torch_dtype") or "float32")
    if dtype not in MERGE_DTYPES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}.")
    tokenizer, peft_model, reference = _base_with_adapter(base_path, adapter_path, prompts, max_new_tokens, dtype=dtype,
                                                          device=device, trust_remote_code=trust_remote_code,
                                                          log=lambda _: None)
    del peft_model
    gc.collect()
    return _compare_with_merged(merged_dir, reference, tokenizer, dtype, device, tolerance)
