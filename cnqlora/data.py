"""Instruction data: reading and validating files, prompt templates, tokens and labels.

A record is {instruct, query, answer} (the column names are configurable). Files are JSON Lines
or one JSON array. The whole file is validated before any model is loaded, and every bad record
is reported as `path:line: reason`, so a long run never dies on record 40,000.

The prompt is built by one function, `encode_prompt`, for training and for inference alike, with
the same special-token handling; the seed built it one way for training and another for
prediction. A training sample is `prompt + answer + EOS` with the loss on `answer + EOS` only.
When a sample is too long the query is shortened, never the answer or its EOS: an answer that
has lost its end teaches the model to never stop.

Text from the data or typed by the user never becomes a control token: a literal `</s>` or
`<|im_end|>` in it is tokenised as ordinary characters. Otherwise one such string in a record
would end the sample early, or let a user forge the template's turns. Only the template's own
markers and the BOS/EOS the code adds are control tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import opt
from .errors import UserError

IGNORE_INDEX = -100
TEMPLATES = ("auto", "baichuan", "chat", "alpaca")
MAX_REPORTED_ERRORS = 20


# --------------------------------------------------------------------------- reading files


@dataclass
class Columns:
    instruct: str = "instruct"
    query: str = "query"
    answer: str = "answer"


@dataclass
class PromptArgs:
    """Prompt and data columns"""

    template: str = opt("auto", "prompt format; auto: baichuan for Baichuan models, the tokenizer's chat template "
                        "for chat models, else alpaca", choices=TEMPLATES)
    instruct_column: str = opt("instruct", "name of the instruction field")
    query_column: str = opt("query", "name of the input-text field (may be absent or empty)")
    answer_column: str = opt("answer", "name of the answer field")

    @property
    def columns(self) -> Columns:
        return Columns(self.instruct_column, self.query_column, self.answer_column)


@dataclass
class BadRecord:
    line: int
    reason: str


@dataclass
class ReadResult:
    records: list[dict[str, Any]]
    bad: list[BadRecord] = field(default_factory=list)


def utf8_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, decode error or None) for each line of the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give the path of a .jsonl/.txt/.json file.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}).") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            yield number, line.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as e:
            yield number, None, (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); "
                                 "save the file as UTF-8")


def first_text(lines: Iterable[tuple[int, str | None, str | None]]) -> str:
    """The first non-blank line of `utf8_lines`, left-stripped: "[" starts a JSON array, "{" JSON Lines."""
    return next((text.lstrip() for _, text, _ in lines if text is not None and text.strip()), "")


class _Decoder(json.JSONDecoder):
    """json's decoder, noting numbers too long for int() instead of failing on them.

    A 5,000-digit number would otherwise raise a plain ValueError (Python's int string-conversion
    limit) that ends the whole array; noted, the item can still be skipped and the rest read.
    """

    def __init__(self) -> None:
        super().__init__(parse_int=self._int)
        self.long_numbers: list[int] = []

    def _int(self, digits: str) -> int:
        try:
            return int(digits)
        except ValueError:
            self.long_numbers.append(len(digits.lstrip("-")))
            return 0

    def number_error(self) -> str | None:
        if not self.long_numbers:
            return None
        longest = max(self.long_numbers)
        self.long_numbers.clear()
        limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
        return (f"a number with {longest:,} digits, more than the {limit:,} Python can read; "
                "put it in quotes to make it a string, or remove it")


def _nesting(text: str, start: int) -> tuple[int, int | None]:
    """(deepest nesting, end offset or None when unbalanced) of the JSON value at `start`.

    Only run after the decoder has given up on a value for nesting too deep (RecursionError), to
    say how deep and to find where the value ends so that the next one can still be read.
    """
    depth = deepest = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
            if depth <= 0:
                return deepest, i + 1
    return deepest, None


def _too_deep(deepest: int) -> str:
    return f"lists/objects nested {deepest:,} levels deep, more than the JSON reader allows"


def _json_array_items(path: str, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Items of a JSON array with the line each starts on, so errors can name a line."""
    decoder = _Decoder()
    pos = text.index("[") + 1

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line_of(e.pos), None, f"invalid JSON in the array ({e.msg}); the rest of the file cannot be read"
            return
        except RecursionError:
            decoder.long_numbers.clear()
            deepest, end = _nesting(text, pos)
            if end is None:
                yield line_of(pos), None, (f"invalid JSON in the array: {_too_deep(deepest)} and never closed; "
                                           "the rest of the file cannot be read")
                return
            yield line_of(pos), None, f"{_too_deep(deepest)}; a record is one object of strings"
        else:
            number_error = decoder.number_error()
            yield line_of(pos), (None if number_error else item), number_error
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return
        yield line_of(pos), None, "expected ',' or ']' after an array item; the rest of the file cannot be read"
        return


def _check_record(obj: Any, columns: Columns, require_answer: bool) -> tuple[dict[str, str] | None, str | None]:
    if not isinstance(obj, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(type(obj), type(obj).__name__)
        return None, (f'expected a JSON object like {{"{columns.instruct}": ..., "{columns.query}": ..., '
                      f'"{columns.answer}": ...}}, got {kind}')
    out = {}
    for key, column, required in ((("instruct", columns.instruct, True)), ("query", columns.query, False),
                                  ("answer", columns.answer, require_answer)):
        value = obj.get(column)
        if value is None:
            if required:
                present = ", ".join(map(str, obj)) or "none"
                return None, f"missing '{column}' (keys present: {present}); set --{key}_column if your file names it differently"
            value = ""
        if not isinstance(value, str):
            return None, f"'{column}' must be a string, got {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:40]}"
        if required and not value.strip():
            return None, f"'{column}' is empty"
        problem = _unicode_problem(value)
        if problem is None and key == "answer" and value.strip():
            problem = _only_control_text(value)
        if problem:
            return None, f"'{column}' {problem}"
        out[key] = value
    return out, None


def is_valid_unicode(value: str) -> bool:
    return _unicode_problem(value) is None


def _unicode_problem(value: str) -> str | None:
    # json.loads accepts a lone \ud800 escape; the tokenizer only fails on it much later, mid-run.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid Unicode: character {e.start + 1} is a lone surrogate \\u{ord(value[e.start]):04x} "
                "(half of a UTF-16 pair); fix that \\u escape in the file (a character above U+FFFF is written "
                "as a pair like \\ud83d\\ude00) or write the character itself in UTF-8")
    return None


# How the common tokenizer families spell their control tokens: SentencePiece, ChatML / GPT /
# Llama 3, BERT, Gemma, Baichuan2. Records are checked before any tokenizer is loaded, so the
# answer check below cannot ask the tokenizer itself.
_CONTROL_TEXT = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>|\[(?:PAD|UNK|CLS|SEP|MASK)\]"
                           r"|<(?:unk|pad|bos|eos|eod|mask|reserved_\d+|start_of_turn|end_of_turn)>")


def _only_control_text(value: str) -> str | None:
    if _CONTROL_TEXT.sub("", value).strip():
        return None
    found = ", ".join(dict.fromkeys(_CONTROL_TEXT.findall(value)))
    return (f"has nothing but special-token text ({found}); it is read as ordinary characters, not as a "
            "control token, so the model would learn to write it. Write the answer itself: the end-of-"
            "sequence token is added after every answer")


def read_records(path: str, columns: Columns | None = None, require_answer: bool = True,
                 lines: list[tuple[int, str | None, str | None]] | None = None) -> ReadResult:
    """Read every record of a JSONL file or JSON array; collect the bad ones with their line.

    `lines`: the file's `utf8_lines`, when the caller has read them already.
    """
    columns = columns or Columns()
    result = ReadResult(records=[])
    lines = list(utf8_lines(path)) if lines is None else lines
    if first_text(lines).startswith("["):
        bad_bytes = [(n, err) for n, _, err in lines if err]
        if bad_bytes:
            result.bad.extend(BadRecord(n, err) for n, err in bad_bytes)
            return result
        text = "\n".join(t for _, t, _ in lines)
        items: Iterator[tuple[int, Any, str | None]] = _json_array_items(path, text)
    else:
        items = _jsonl_items(lines)
    for number, obj, error in items:
        if error is None:
            record, error = _check_record(obj, columns, require_answer)
            if record is not None:
                record["line"] = number
                result.records.append(record)
                continue
        result.bad.append(BadRecord(number, error))
    return result


def _jsonl_items(lines: list[tuple[int, str | None, str | None]]) -> Iterator[tuple[int, Any, str | None]]:
    decoder = _Decoder()
    for number, text, error in lines:
        if error is not None:
            yield number, None, error
            continue
        if not text.strip():
            continue
        try:
            obj = decoder.decode(text)
        except json.JSONDecodeError as e:
            yield number, None, f"invalid JSON ({e.msg} at column {e.colno})"
        except RecursionError:
            decoder.long_numbers.clear()
            yield number, None, f"{_too_deep(_nesting(text, 0)[0])}; a record is one object of strings"
        else:
            number_error = decoder.number_error()
            yield number, (None if number_error else obj), number_error


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_records(path: str, columns: Columns | None = None, skip_bad_lines: bool = False,
                 require_answer: bool = True, log: Callable[[str], None] = _to_stderr,
                 lines: list[tuple[int, str | None, str | None]] | None = None) -> list[dict[str, Any]]:
    """Validated records of a data file; stops with every problem listed unless skip_bad_lines.

    `lines`: as for `read_records`.
    """
    result = read_records(path, columns, require_answer, lines)
    if result.bad:
        for bad in result.bad[:MAX_REPORTED_ERRORS]:
            log(f"{path}:{bad.line}: {bad.reason}")
        if len(result.bad) > MAX_REPORTED_ERRORS:
            log(f"{path}: ... and {len(result.bad) - MAX_REPORTED_ERRORS} more bad records")
        if not skip_bad_lines:
            raise UserError(f"{path}: {len(result.bad)} bad record(s) out of {len(result.bad) + len(result.records)}. "
                            "Fix them, or pass --skip_bad_lines to train on the rest.")
        log(f"{path}: skipped {len(result.bad)} bad record(s), kept {len(result.records)}")
    if not result.records:
        raise UserError(f"{path}: no usable records.")
    return result.records


# --------------------------------------------------------------------------- prompts


_ALPACA_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n")
_ALPACA_HEAD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n")
_SENTINEL = "\u2063CNQLORA_USER_TEXT\u2063"


def resolve_template(name: str, tokenizer: Any, model_type: str | None) -> str:
    """`auto` picks the seed's format for Baichuan, the tokenizer's chat template for chat models."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}.")
    if name == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("template 'chat' needs a tokenizer with a chat template; this one has none. "
                        "Use --template baichuan or alpaca.")
    if name != "auto":
        return name
    if model_type == "baichuan":
        return "baichuan"
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "alpaca"


def _chat_frame(tokenizer: Any) -> tuple[str, str]:
    """The text a chat template puts before and after the user's message (generation prompt on)."""
    cache = getattr(tokenizer, "_cnqlora_chat_frame", None)
    if cache is None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(_SENTINEL) != 1:
            raise UserError("the tokenizer's chat template does not insert the user message verbatim; "
                            "use --template baichuan or alpaca.")
        cache = tuple(rendered.split(_SENTINEL))
        tokenizer._cnqlora_chat_frame = cache
    return cache


Parts = list[tuple[str, bool]]  # (text, whether it comes from the data or the user)


def prompt_segments(tokenizer: Any, template: str, instruct: str, query: str) -> tuple[Parts, str, str]:
    """The prompt as (the parts before the query, the query, the template text after it)."""
    if template == "baichuan":
        # The seed's format: "Human: \n{instruct}\n{query}\n\nAssistant: \n".
        return [("Human: \n", False), (instruct, True), ("\n" if query else "", False)], query, "\n\nAssistant: \n"
    if template == "alpaca":
        if query:
            head = [(_ALPACA_HEAD + "### Instruction:\n", False), (instruct, True), ("\n\n### Input:\n", False)]
            return head, query, "\n\n### Response:\n"
        return [(_ALPACA_HEAD_NO_INPUT + "### Instruction:\n", False), (instruct, True)], "", "\n\n### Response:\n"
    if template == "chat":
        before, after = _chat_frame(tokenizer)
        return [(before, False), (instruct, True), ("\n" if query else "", False)], query, after
    raise ValueError(f"template {template!r} must be resolved first")


def _control_tokens(tokenizer: Any) -> re.Pattern | None:
    """Matches the strings this tokenizer reads as control tokens; None when it has none."""
    key = (len(tokenizer), tuple(tokenizer.all_special_tokens))
    cached = getattr(tokenizer, "_cnqlora_control_tokens", None)
    if cached is None or cached[0] != key:
        names = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(key[1])
        names.discard("")
        # longest first, so that a token containing another is matched whole
        pattern = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True)))) if names else None
        cached = (key, pattern)
        tokenizer._cnqlora_control_tokens = cached
    return cached[1]


def _encode_parts(tokenizer: Any, parts: Parts) -> list[int]:
    """Ids of the parts joined; a control-token string is a control token only where the template wrote it.

    Text is encoded whole, as the tokenizer always did, unless data or user text holds such a
    string: then each of those occurrences alone is encoded with special-token parsing off, so it
    becomes ordinary pieces, and the text around it as before. Encoding the whole string with
    parsing off would be simpler but would also turn the template's own markers into text.
    """
    text = "".join(t for t, _ in parts)
    if not text:
        return []
    pattern = _control_tokens(tokenizer) if any(user and t for t, user in parts) else None
    if pattern is None or not pattern.search(text):
        return tokenizer.encode(text, add_special_tokens=False)
    user_spans, offset = [], 0
    for part, user in parts:
        if user:
            user_spans.append((offset, offset + len(part)))
        offset += len(part)
    ids, done = [], 0
    for match in pattern.finditer(text):
        if not any(start < match.end() and match.start() < end for start, end in user_spans):
            continue  # the template's own marker
        if match.start() > done:
            ids += tokenizer.encode(text[done:match.start()], add_special_tokens=False)
        ids += tokenizer.encode(match.group(), add_special_tokens=False, split_special_tokens=True)
        done = match.end()
    if done < len(text):
        ids += tokenizer.encode(text[done:], add_special_tokens=False)
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Data or user text: never control tokens."""
    return _encode_parts(tokenizer, [(text, True)])


def _bos(tokenizer: Any, template: str) -> list[int]:
    # Chat templates write their own start tokens; the plain formats start like pre-training text.
    if template == "chat" or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Plain text as a model input, without a template: BOS (when the tokenizer has one) + text."""
    return _bos(tokenizer, "plain") + _encode(tokenizer, text)


@dataclass
class EncodedPrompt:
    ids: list[int]
    query_tokens: int
    query_kept: int


def encode_prompt(tokenizer: Any, template: str, instruct: str, query: str = "",
                  max_query_tokens: int | None = None) -> EncodedPrompt:
    """Token ids of the prompt; the one place that builds it, for training and for inference.

    Segments are tokenised separately so the query can be shortened on a token boundary; the
    same segmentation is used at inference, so the model sees the same ids it was trained on.
    """
    before, query, after = prompt_segments(tokenizer, template, instruct, query)
    query_ids = _encode(tokenizer, query)
    kept = query_ids if max_query_tokens is None else query_ids[:max(0, max_query_tokens)]
    ids = (_bos(tokenizer, template) + _encode_parts(tokenizer, before) + kept
           + _encode_parts(tokenizer, [(after, False)]))
    return EncodedPrompt(ids, len(query_ids), len(kept))


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; the model could never learn to stop. "
                        "Set eos_token in its tokenizer_config.json.")
    return tokenizer.eos_token_id


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    shortened: bool


def encode_sample(tokenizer: Any, template: str, record: dict[str, str], max_seq_len: int) -> EncodedSample | None:
    """prompt + answer + EOS with labels on answer + EOS; None when it cannot fit even with no query."""
    answer = _encode(tokenizer, record["answer"]) + [eos_id(tokenizer)]
    prompt = encode_prompt(tokenizer, template, record["instruct"], record["query"])
    shortened = False
    if len(prompt.ids) + len(answer) > max_seq_len:
        overhead = len(prompt.ids) - prompt.query_kept
        budget = max_seq_len - overhead - len(answer)
        if budget < 0:
            return None
        prompt = encode_prompt(tokenizer, template, record["instruct"], record["query"], max_query_tokens=budget)
        shortened = True
    return EncodedSample(prompt.ids + answer, [IGNORE_INDEX] * len(prompt.ids) + answer, shortened)


# --------------------------------------------------------------------------- datasets


@dataclass
class LengthStats:
    records: int
    samples: int
    shortened: int
    dropped: int
    mean: float
    p95: int
    max: int
    labelled_mean: float
    labelled_max: int = 0  # answer + EOS: how many new tokens generation must allow
    # of `dropped`, those whose answer + EOS fits alone but not after the instruction and template
    dropped_for_prompt: int = 0

    def describe(self, name: str, max_seq_len: int) -> str:
        reasons = []
        if self.dropped > self.dropped_for_prompt:
            reasons.append(f"{self.dropped - self.dropped_for_prompt:,} with answer + EOS longer than {max_seq_len}")
        if self.dropped_for_prompt:
            reasons.append(f"{self.dropped_for_prompt:,} with instruction + template + answer + EOS longer than "
                           f"{max_seq_len}, the query cut to nothing")
        return (f"{name}: {self.records:,} records -> {self.samples:,} samples; tokens/sample mean {self.mean:.1f}, "
                f"p95 {self.p95}, max {self.max} (labelled mean {self.labelled_mean:.1f}, max {self.labelled_max}); "
                f"{self.shortened:,} shortened (query cut to fit {max_seq_len}), "
                f"{self.dropped:,} dropped" + (f" ({'; '.join(reasons)})" if reasons else ""))


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer's behaviour for the tokenisation cache."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and os.path.isfile(vocab_file):
        with open(vocab_file, "rb") as f:
            h.update(f.read())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()[:16]


# Part of the cache key: caches written before control-token strings in the data were encoded as
# text (1) must not be reused.
_ENCODING_VERSION = 2


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, template: str, max_seq_len: int,
                     cache_dir: str | None = None):
    """A `datasets.Dataset` of input_ids/labels (cached on disk when cache_dir is set) and its stats."""
    import datasets

    datasets.disable_progress_bars()
    content = hashlib.sha256(json.dumps([(r["instruct"], r["query"], r["answer"]) for r in records],
                                        ensure_ascii=False).encode()).hexdigest()[:16]
    fingerprint = f"{content}-{tokenizer_fingerprint(tokenizer)}-{template}-{max_seq_len}-{_ENCODING_VERSION}"
    raw = datasets.Dataset.from_list([{k: r[k] for k in ("instruct", "query", "answer")} for r in records])

    def encode(row: dict[str, str]) -> dict[str, Any]:
        sample = encode_sample(tokenizer, template, row, max_seq_len)
        if sample is None:
            # Only the query is ever cut, so either the answer + EOS cannot fit, or it can but not
            # after the instruction and the template.
            answer_fits = len(_encode(tokenizer, row["answer"])) + 1 <= max_seq_len
            return {"input_ids": [], "labels": [], "shortened": False, "dropped": "prompt" if answer_fits else "answer"}
        return {"input_ids": sample.input_ids, "labels": sample.labels, "shortened": sample.shortened, "dropped": ""}

    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"tokenized-{fingerprint}.arrow")
    encoded = raw.map(encode, remove_columns=raw.column_names, cache_file_name=cache_file,
                      new_fingerprint=fingerprint, load_from_cache_file=cache_file is not None)
    reasons = list(encoded["dropped"])
    dropped = sum(1 for r in reasons if r)
    shortened = sum(encoded["shortened"])
    kept = encoded.filter(lambda d: not d, input_columns="dropped", keep_in_memory=True)
    kept = kept.remove_columns(["shortened", "dropped"])
    lengths = sorted(len(ids) for ids in kept["input_ids"])
    labelled = [sum(1 for t in labels if t != IGNORE_INDEX) for labels in kept["labels"]]
    stats = LengthStats(
        records=len(records), samples=len(lengths), shortened=shortened, dropped=dropped,
        mean=sum(lengths) / max(1, len(lengths)), p95=_percentile(lengths, 0.95), max=lengths[-1] if lengths else 0,
        labelled_mean=sum(labelled) / max(1, len(labelled)), labelled_max=max(labelled, default=0),
        dropped_for_prompt=reasons.count("prompt"),
    )
    return kept, stats
