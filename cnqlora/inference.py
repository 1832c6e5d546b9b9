"""Prediction: interactive chat, file runs with resume and metrics, adapter merge.

File runs write one JSON line per predicted record, in input order, flushed after every window of
batches: an interrupted run keeps what it finished, and `--resume` continues after the last
complete line (after checking that those lines belong to this data file). Each prediction
carries `line`: where its record starts in the data file.

With `--skip_bad_lines` a bad record gets no prediction line at all, rather than a placeholder:
the scorers (score_predictions, bench/ner_errors.py, bench/ner_vote.py) read every line as a
prediction with an output, and a placeholder would be scored as an empty answer or refused.
The predictions are then those of the good records in order, `line` says which record each
one is, and --resume counts finished lines among the good records, which is the same list as
long as the data file is unchanged (and it checks that it is).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, TextIO

from .adapters import MERGE_DTYPES
from .config import opt
from .data import (MAX_REPORTED_ERRORS, BadRecord, PromptArgs, encode_prompt, encode_text, first_text, is_valid_unicode,
                   read_records, resolve_template, utf8_lines)
from .errors import UserError
from .generation import GenerationArgs, TextStream, answer_many
from .models import ModelArgs
from .speed import FUSED_KERNELS


ADAPTER_MODES = ("auto", "merged", "lora")


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
    skip_bad_lines: bool = opt(False, "predict the good records of a --data_file with bad ones (they are listed "
                               "and get no prediction line; each line's `line` names its record)")
    limit: int | None = opt(None, "predict only the first N records")
    types: list[str] = opt([], "entity types for metrics and grounded decoding; default: those of the references")
    grounded: bool = opt(False, "constrain answers to 没有 or `entity_type` lines whose entities occur in the "
                         "text (NER)")
    adapter_mode: str = opt("auto", "how --lora_model is applied: merged = folded into a 16-bit copy of the base "
                            "in memory (fastest, a rank-128 average costs nothing; needs the 16-bit weights' "
                            "memory), lora = the quantised base + LoRA layers (least memory), auto = merged on a "
                            "GPU with room for it, else lora", choices=ADAPTER_MODES)
    merge_to: str | None = opt(None, "write base + adapter merged into this folder (a plain Hugging Face model) "
                               "and exit")
    merge_dtype: str = opt("bfloat16", "dtype of the merged weights", choices=MERGE_DTYPES)
    average_adapters: list[str] = opt([], "adapter folders of one base model (comma-separated, e.g. the best "
                                      "adapters of several seeds): write the adapter that is their mean to "
                                      "--average_to and exit; no model is loaded")
    average_to: str | None = opt(None, "where --average_adapters writes the averaged adapter")
    fused_kernels: str = opt("auto", "Liger-Kernel's fused RMSNorm, SwiGLU and RoPE for generation; auto: when "
                             "installed and a CUDA GPU is present", choices=FUSED_KERNELS)
    gpus: str | None = opt(None, "GPU ids to use, e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES)")
    only_cpu: bool = opt(False, "run on the CPU")

    def validate(self) -> None:
        if self.instruct == "msra":
            from .msra import QUERY_PREFIX, SEED_INSTRUCTION

            self.instruct = SEED_INSTRUCTION
            self.query_prefix = self.query_prefix or QUERY_PREFIX
        if self.interactive and self.data_file:
            raise UserError("choose one of --interactive and --data_file.")
        for name in ("resume", "skip_bad_lines"):
            if getattr(self, name) and not self.data_file:
                raise UserError(f"--{name} needs --data_file.")
        if self.limit is not None and self.limit < 1:
            # items[:0] used to mean every record and items[:-1] all but the last
            raise UserError("--limit must be at least 1 (leave it out to predict every record).")
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


def _merge_in_memory(mode: str, model_args: ModelArgs, device: str) -> bool:
    """Whether to fold the adapter into a 16-bit base (adapter_mode; auto: a GPU with room for it)."""
    if mode != "auto" or model_args.quantization == "none":
        return mode == "merged" and model_args.quantization != "none"
    if not device.startswith("cuda"):
        return False  # a CPU computes in float32: the 4-bit base is what keeps it small
    import torch

    from .models import weight_file_bytes

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    # the 16-bit weights plus room for activations and the engine's KV cache
    return 1.5 * weight_file_bytes(model_args.model_name_or_path) < free


def load_for_inference(model_args: ModelArgs, prompt_args: PromptArgs, lora_model: str | None,
                       adapter_mode: str = "lora", fused_kernels: str = "off", grounded: bool = False) -> Loaded:
    """Base model (quantised as asked) + optional adapter, checked before anything heavy loads.

    adapter_mode merged (or auto with room on the GPU) loads the base in 16 bits and folds the
    adapter into it: prediction then runs plain matmuls with no LoRA layers, whatever the rank.
    fused_kernels as training's: on a small model a decode step is hundreds of short kernels, and
    Liger's fused norm, RoPE and SwiGLU remove about half of them.
    grounded: build the tokenizer's byte table for grounded decoding now, before the model: a
    tokenizer it cannot serve fails before minutes of loading, and the table (a third of a second
    for a 150k vocabulary) is made once per process, not inside the first prediction run.
    """
    from .models import check_model_folder, load_model, load_tokenizer, resolve_device
    from .speed import apply_fused_kernels, resolve_fused_kernels

    started = time.time()
    config = check_model_folder(model_args.model_name_or_path, need_tokenizer=model_args.tokenizer_path is None,
                                trust_remote_code=model_args.trust_remote_code)
    adapter = None
    if lora_model is not None:
        from .adapters import read_adapter

        adapter = read_adapter(lora_model)
    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.model_name_or_path, model_args.trust_remote_code)
    template = resolve_template(prompt_args.template, tokenizer, config.get("model_type"))
    if grounded:
        from .grounded import token_trie

        try:
            token_trie(tokenizer)
        except ValueError as e:
            raise UserError(f"--grounded: {e}") from None
    device = resolve_device(model_args.device)
    fused = resolve_fused_kernels(fused_kernels, device.startswith("cuda"), []) == "liger"
    merged = adapter is not None and _merge_in_memory(adapter_mode, model_args, device)
    if merged:
        model_args = replace(model_args, quantization="none")
    model = load_model(model_args, device)
    model.config.use_cache = True
    if adapter is not None:
        from .adapters import attach_adapter, use_trained_eos

        # log: notes about old adapter formats (dropped config keys) reach the user
        model = attach_adapter(model, adapter, log=print)
        use_trained_eos(tokenizer, model, lora_model, log=print)
        if merged:
            model = model.merge_and_unload()
    model.eval()
    if fused:
        apply_fused_kernels(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    description = (f"model {model_args.model_name_or_path} ({config.get('model_type')}, {model_args.quantization}, "
                   f"compute {dtype}) + {('adapter ' + lora_model + (' (merged in memory)' if merged else '')) if lora_model else 'no adapter'} on {device}; "
                   f"template {template}" + ("; Liger's fused kernels" if fused else ""))
    return Loaded(model, tokenizer, template, description, time.time() - started, device)


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    instruct: str
    query: str
    reference: str | None
    line: int | None = None  # where the record starts in the data file


def read_inputs(path: str, prompt_args: PromptArgs, args: PredictArgs) -> list[Item]:
    """JSON Lines records (answer optional) or plain text lines, validated before the model loads."""
    lines = list(utf8_lines(path))
    if first_text(lines).startswith(("{", "[")):
        result = read_records(path, prompt_args.columns, require_answer=False, lines=lines)
        items = [Item(r["instruct"], r["query"], r["answer"] or None, r["line"]) for r in result.records]
        bad = result.bad
    else:
        items, bad = [], []
        for number, text, error in lines:
            if error:
                bad.append(BadRecord(number, error))
            elif text.strip():
                items.append(_typed_item(text.strip(), args, number))
    if bad:
        _report_bad_records(path, bad, len(items), args.skip_bad_lines)
    if not items:
        raise UserError(f"{path}: no input lines." if not bad else f"{path}: no usable records.")
    return items


def _report_bad_records(path: str, bad: list[BadRecord], kept: int, skip: bool) -> None:
    # data.load_records words its advice for training; prediction lists them the same way, in its own words.
    for record in bad[:MAX_REPORTED_ERRORS]:
        print(f"{path}:{record.line}: {record.reason}", file=sys.stderr)
    if len(bad) > MAX_REPORTED_ERRORS:
        print(f"{path}: ... and {len(bad) - MAX_REPORTED_ERRORS} more bad records", file=sys.stderr)
    if not skip:
        raise UserError(f"{path}: {len(bad)} bad record(s) out of {len(bad) + kept}. Fix them, or pass "
                        "--skip_bad_lines to predict the rest.")
    print(f"{path}: skipped {len(bad)} bad record(s), kept {kept}; they get no prediction line (the `line` of "
          "each prediction names its record)", file=sys.stderr)


def _grounding(loaded: Loaded, items: list[Item], types: list[str], gen: GenerationArgs) -> dict[str, Any]:
    """answer_many's grounded-decoding arguments for these items: engine constraints and a generate() factory."""
    from .generation import engine_reason
    from .grounded import GroundedAnswer, grounded_processor_factory, ner_text_from_query

    queries = [item.query or item.instruct for item in items]
    if engine_reason(loaded.model, gen) is None:
        shared: dict = {}
        # EOS as the generate() path's processor has it: the tokenizer's (the one training used)
        return {"constraints": [GroundedAnswer(loaded.tokenizer, ner_text_from_query(q), types, gen.max_new_tokens,
                                               shared=shared) for q in queries]}
    return {"grounded_factory": lambda batch: grounded_processor_factory(loaded.tokenizer,
                                                                         [queries[i] for i in batch], types)}


def _typed_item(text: str, args: PredictArgs, line: int | None = None) -> Item:
    if args.instruct:
        return Item(args.instruct, args.query_prefix + text, None, line)
    return Item(args.query_prefix + text, "", None, line)


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
            if not is_valid_unicode(line):
                # stdin decodes undecodable bytes to lone surrogates under a C/POSIX locale; the
                # tokenizer would die on them, and with it the session.
                out.write("(this input is not valid UTF-8, so it was not answered; set a UTF-8 locale, e.g. "
                          "LANG=C.UTF-8, or type it again)\n\n")
                continue
            item = _typed_item(line.strip(), args)
            ids = prompt_ids(loaded.tokenizer, loaded.template, item, args.with_prompt)
            out.write("Response: ")
            stream = TextStream(loaded.tokenizer, out)
            grounding = _grounding(loaded, [item], types, gen) if args.grounded else {}
            answer_many(loaded.model, loaded.tokenizer, [ids], gen,
                        on_token=lambda _, token: stream.put(torch.tensor([token])), **grounding)
            stream.end()
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
        item = items[number - 1] if number <= len(items) else None
        # `line` is absent from files written before it existed; their inputs alone must match
        if item is None or row.get("instruct") != item.instruct or row.get("input") != item.query or \
                row.get("line", item.line) != item.line:
            record = f"line {item.line}" if item is not None and item.line is not None else f"record {number}"
            raise UserError(f"{path}:{number}: this prediction is for another input than {record} of the data "
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
    engine: dict[str, Any] = {}
    grounding_s = 0.0
    with open(path, mode, encoding="utf-8") as f:
        # Windows bound what an interruption loses: answers come back in any order, and a window's
        # rows are written in input order once it is done. Each window is one engine run whose last
        # answers decode with few slots busy, so windows are large (the official MSRA test is one).
        window = max(gen.batch_size * 32, 8192)
        for begin in range(0, len(todo), window):
            part = range(begin, min(begin + window, len(todo)))
            began = time.time()
            grounding = _grounding(loaded, [todo[i] for i in part], types, gen) if args.grounded else {}
            grounding_s += time.time() - began
            answers = answer_many(loaded.model, loaded.tokenizer, [ids[i] for i in part], gen,
                                  on_answer=lambda *_: bar.update(1), stats=engine, **grounding)
            for i, answer in zip(part, answers):
                row = {"line": todo[i].line, "instruct": todo[i].instruct, "input": todo[i].query,
                       "output": answer}
                if todo[i].reference is not None:
                    row["reference"] = todo[i].reference
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    bar.close()
    seconds = time.time() - started
    return {"predicted": len(todo), "seconds": seconds,
            "sentences_per_s": len(todo) / seconds if seconds > 0 else 0.0, "types": types,
            "engine": engine, "grounding_s": grounding_s}


def describe_run(run: dict[str, Any]) -> str:
    """Where a prediction run's time went, in one line (what the engine counted, if it ran)."""
    e = run.get("engine") or {}
    parts = []
    if e:
        parts.append(f"engine: {e.get('decode_steps', 0)} decode steps, {e.get('prefill_calls', 0)} prefill calls, "
                     f"{e.get('slots')} slots, {e.get('kv_gib', 0.0):.2f} GiB cache, waited {e.get('wait_s', 0.0):.2f}s "
                     f"for the device")
        if e.get("rewinds"):
            parts.append(f"{e['rewinds']} refused tokens redone ({e.get('masked_rows', 0)} with the full mask)")
    if run.get("grounding_s"):
        parts.append(f"grounded answers set up in {run['grounding_s']:.2f}s")
    return "; ".join(parts)


def score_predictions(path: str, types: list[str] | None = None) -> dict[str, Any] | None:
    """Entity-level metrics over a predictions file, or None when it has no references."""
    from .evaluation import score_answers

    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if "reference" in r]
    if not rows:
        return None
    return score_answers([r["output"] for r in rows], [r["reference"] for r in rows],
                         [(r["instruct"], r["input"]) for r in rows], types)
