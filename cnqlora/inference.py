"""Prediction: interactive chat, file runs with resume and metrics, adapter merge.

File runs write one JSON line per input record, in input order, flushed after every window of
batches: an interrupted run keeps what it finished, and `--resume` continues after the last
complete line (after checking that those lines belong to this data file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from .adapters import MERGE_DTYPES
from .config import opt
from .data import (PromptArgs, encode_prompt, encode_text, first_text, load_records, read_records, resolve_template,
                   utf8_lines)
from .errors import UserError
from .generation import GenerationArgs, TextStream, generate_batch, length_sorted_batches
from .models import ModelArgs


@dataclass
class PredictArgs:
    """Prediction"""

    lora_model: str | None = opt(None, "adapter folder from training; none: the base model alone")
    model_name: str | None = opt(None, "a name for the model in the banner (the seed's flag)")
    with_prompt: bool = opt(True, "wrap the input in the prompt template (false: raw completion)")
    interactive: bool = opt(False, "chat in the terminal, one question at a time")
    instruct: str | None = opt(None, "fixed instruction: you then type only the text (interactive and plain-text "
                               "files); msra = the seed's MSRA NER instruction, with query_prefix 文本：")
    query_prefix: str = opt("", "put before each typed or plain-text input (MSRA data uses 文本：)")
    data_file: str | None = opt(None, "JSON Lines records (instruct/query, answer optional) or plain text lines")
    predictions_file: str | None = opt(None, "where to write predictions (JSON Lines); default: "
                                       "<data_file>.predictions.jsonl")
    metrics_file: str | None = opt(None, "where to write metrics (JSON) when references exist; default: "
                                   "<predictions_file>.metrics.json")
    resume: bool = opt(False, "keep the finished lines of predictions_file and continue after them")
    limit: int | None = opt(None, "predict only the first N records")
    types: list[str] = opt([], "entity types for metrics and grounded decoding; default: those of the references")
    grounded: bool = opt(False, "constrain answers to 没有 or `entity_type` lines whose entities occur in the "
                         "text (NER)")
    merge_to: str | None = opt(None, "write base + adapter merged into this folder (a plain Hugging Face model) "
                               "and exit")
    merge_dtype: str = opt("bfloat16", "dtype of the merged weights", choices=MERGE_DTYPES)
    average_adapters: list[str] = opt([], "adapter folders of one base model (comma-separated, e.g. the best "
                                      "adapters of several seeds): write the adapter that is their mean to "
                                      "--average_to and exit; no model is loaded")
    average_to: str | None = opt(None, "where --average_adapters writes the averaged adapter")
    gpus: str | None = opt(None, "GPU ids to use, e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES)")
    only_cpu: bool = opt(False, "run on the CPU")

    def validate(self) -> None:
        if self.instruct == "msra":
            from .msra import QUERY_PREFIX, SEED_INSTRUCTION

            self.instruct = SEED_INSTRUCTION
            self.query_prefix = self.query_prefix or QUERY_PREFIX
        if self.interactive and self.data_file:
            raise UserError("choose one of --interactive and --data_file.")
        if self.resume and not self.data_file:
            raise UserError("--resume needs --data_file.")
        if bool(self.average_adapters) != bool(self.average_to):
            raise UserError("--average_adapters A,B,... and --average_to DIR go together: the adapters to average "
                            "and the folder for their mean.")
        if self.average_to and (self.merge_to or self.data_file or self.interactive or self.lora_model):
            raise UserError("--average_to only writes the averaged adapter; run predict.py again with "
                            "--lora_model <that folder> to predict with it or merge it.")


PREDICT_SECTIONS = [ModelArgs, PromptArgs, PredictArgs, GenerationArgs]


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: str
    description: str
    seconds: float
    device: str


def load_for_inference(model_args: ModelArgs, prompt_args: PromptArgs, lora_model: str | None) -> Loaded:
    """Base model (quantised as asked) + optional adapter, checked before anything heavy loads."""
    from .models import check_model_folder, load_model, load_tokenizer, resolve_device

    started = time.time()
    config = check_model_folder(model_args.model_name_or_path, need_tokenizer=model_args.tokenizer_path is None,
                                trust_remote_code=model_args.trust_remote_code)
    adapter = None
    if lora_model is not None:
        from .adapters import read_adapter

        adapter = read_adapter(lora_model)
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.model_name_or_path, model_args.trust_remote_code)
    template = resolve_template(prompt_args.template, tokenizer, config.get("model_type"))
    device = resolve_device(model_args.device)
    model = load_model(model_args, device)
    model.config.use_cache = True
    if adapter is not None:
        from .adapters import attach_adapter, use_trained_eos

        # log: notes about old adapter formats (dropped config keys) reach the user
        model = attach_adapter(model, adapter, log=print)
        use_trained_eos(tokenizer, model, lora_model, log=print)
    model.eval()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    description = (f"model {model_args.model_name_or_path} ({config.get('model_type')}, {model_args.quantization}, "
                   f"compute {dtype}) + {'adapter ' + lora_model if lora_model else 'no adapter'} on {device}; "
                   f"template {template}")
    return Loaded(model, tokenizer, template, description, time.time() - started, device)


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    instruct: str
    query: str
    reference: str | None


def read_inputs(path: str, prompt_args: PromptArgs, args: PredictArgs) -> list[Item]:
    """JSON Lines records (answer optional) or plain text lines, validated before the model loads."""
    lines = list(utf8_lines(path))
    if first_text(lines).startswith(("{", "[")):
        records = load_records(path, prompt_args.columns, require_answer=False, lines=lines)
        return [Item(r["instruct"], r["query"], r["answer"] or None) for r in records]
    items = []
    for number, text, error in lines:
        if error:
            raise UserError(f"{path}:{number}: {error}")
        if text.strip():
            items.append(_typed_item(text.strip(), args))
    if not items:
        raise UserError(f"{path}: no input lines.")
    return items


def _typed_item(text: str, args: PredictArgs) -> Item:
    if args.instruct:
        return Item(args.instruct, args.query_prefix + text, None)
    return Item(args.query_prefix + text, "", None)


def prompt_ids(tokenizer, template: str, item: Item, with_prompt: bool) -> list[int]:
    if with_prompt:
        return encode_prompt(tokenizer, template, item.instruct, item.query).ids
    return encode_text(tokenizer, item.instruct + ("\n" + item.query if item.query else ""))


# --------------------------------------------------------------------------- grounded decoding


def entity_types(args: PredictArgs, items: list[Item]) -> list[str]:
    """The types grounded decoding may answer with: --types, else the references', else the training data's.

    Checked here because both interactive and file runs need them before the first generate().
    """
    from .grounded import allowed_types_from_answers

    if args.types:
        return list(args.types)
    types = allowed_types_from_answers(i.reference for i in items if i.reference)
    if not types and args.lora_model:
        types = _types_from_training_data(args.lora_model)
    if not types:
        raise UserError("--grounded needs the entity types: pass --types 人名,地名,机构名 (no references or training "
                        "data to infer them from).")
    return types


def _types_from_training_data(adapter: str) -> list[str]:
    from .adapters import adapter_train_config, train_config_columns
    from .grounded import allowed_types_from_answers

    settings = adapter_train_config(adapter)
    train_file = settings.get("train_file")
    if not isinstance(train_file, str) or not os.path.isfile(train_file):
        return []
    result = read_records(train_file, train_config_columns(settings))
    return allowed_types_from_answers(r["answer"] for r in result.records[:20000])


# --------------------------------------------------------------------------- interactive


BANNER = "=" * 85


def interactive(loaded: Loaded, args: PredictArgs, gen: GenerationArgs, stdin: TextIO | None = None,
                out: TextIO | None = None) -> int:
    """Single-turn chat: each input is answered on its own, streamed token by token."""
    import torch

    from .grounded import grounded_processor_factory

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    name = args.model_name or os.path.basename(os.path.normpath(loaded.model.name_or_path or "model"))
    print(BANNER, file=out)
    print(f"+ 当前使用的模型是：{name}", file=out)
    print(f"+ {loaded.description}", file=out)
    print(f"+ 加载耗时 load time: {loaded.seconds:.1f}s", file=out)
    print("+ 该模式下仅支持单轮问答，无多轮对话能力。Single turn only. Empty line or Ctrl-D to quit.", file=out)
    if args.instruct:
        print(f"+ 指令 instruction: {args.instruct}", file=out)
    print(BANNER, file=out)
    answered = 0
    types = entity_types(args, []) if args.grounded else []
    torch.manual_seed(gen.seed)
    try:
        while True:
            out.write("Input: ")
            out.flush()
            line = stdin.readline()
            if not line or not line.strip():
                break
            item = _typed_item(line.strip(), args)
            ids = prompt_ids(loaded.tokenizer, loaded.template, item, args.with_prompt)
            out.write("Response: ")
            stream = TextStream(loaded.tokenizer, out, skip_prompt_tokens=len(ids))
            factory = (grounded_processor_factory(loaded.tokenizer, [item.query or item.instruct], types)
                       if args.grounded else None)
            generate_batch(loaded.model, loaded.tokenizer, [ids], gen, factory, streamer=stream)
            out.write("\n\n")
            answered += 1
    except KeyboardInterrupt:
        out.write("\n")
    print(f"bye ({answered} answered)", file=out)
    return 0


# --------------------------------------------------------------------------- files


def _resume_point(path: str, items: list[Item]) -> int:
    """Number of finished lines in an earlier predictions file; a torn last line is cut off."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    complete = lines[:-1]  # a line without its newline was being written when the run stopped
    done = 0
    for number, line in enumerate(complete, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a prediction line; remove the file or drop --resume.") from None
        if number > len(items) or row.get("instruct") != items[number - 1].instruct or \
                row.get("input") != items[number - 1].query:
            raise UserError(f"{path}:{number}: this prediction is for another input than line {number} of the data "
                            "file; predict into a new file or drop --resume.")
        done = number
    with open(path, "r+b") as f:
        f.truncate(sum(len(line) + 1 for line in complete))
    return done


def predict_file(loaded: Loaded, items: list[Item], args: PredictArgs, gen: GenerationArgs,
                 log=print) -> dict[str, Any]:
    """Predict every item, appending to the predictions file in input order; return counts and speed."""
    import torch
    from tqdm.auto import tqdm

    from .grounded import grounded_processor_factory

    path = args.predictions_file
    start = _resume_point(path, items) if args.resume else 0
    if start:
        log(f"resuming: {start} of {len(items)} records already in {path}")
    todo = items[start:]
    types = entity_types(args, items) if args.grounded else []
    ids = [prompt_ids(loaded.tokenizer, loaded.template, item, args.with_prompt) for item in todo]
    torch.manual_seed(gen.seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    started = time.time()
    mode = "a" if start else "w"
    bar = tqdm(total=len(todo), desc="predicting", unit="sent", dynamic_ncols=True)
    with open(path, mode, encoding="utf-8") as f:
        for window in length_sorted_batches([len(x) for x in ids], gen.batch_size, window=gen.batch_size * 8):
            outputs: dict[int, str] = {}
            for batch in window:
                factory = None
                if args.grounded:
                    factory = grounded_processor_factory(
                        loaded.tokenizer, [todo[i].query or todo[i].instruct for i in batch], types)
                answers = generate_batch(loaded.model, loaded.tokenizer, [ids[i] for i in batch], gen, factory)
                outputs.update(zip(batch, answers))
                bar.update(len(batch))
            for i in sorted(outputs):
                row = {"instruct": todo[i].instruct, "input": todo[i].query, "output": outputs[i]}
                if todo[i].reference is not None:
                    row["reference"] = todo[i].reference
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    bar.close()
    seconds = time.time() - started
    return {"predicted": len(todo), "seconds": seconds,
            "sentences_per_s": len(todo) / seconds if seconds > 0 else 0.0, "types": types}


def score_predictions(path: str, types: list[str] | None = None) -> dict[str, Any] | None:
    """Entity-level metrics over a predictions file, or None when it has no references."""
    from .evaluation import score_answers

    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if "reference" in r]
    if not rows:
        return None
    return score_answers([r["output"] for r in rows], [r["reference"] for r in rows],
                         [(r["instruct"], r["input"]) for r in rows], types)
