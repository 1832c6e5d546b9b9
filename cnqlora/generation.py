"""Generation: batched greedy decoding for files, token streaming for chat.

Prompts come from `data.encode_prompt`, the function training uses, so the model sees at
inference exactly the ids it was trained on. Batches are left-padded (new tokens then line up at
the right edge for every row) and use the KV cache. Greedy decoding is the default: NER is an
extraction task with one right answer, and the seed's repetition penalty punished the very thing
the model must do, copying entity names from the input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .config import opt
from .errors import UserError


@dataclass
class GenerationArgs:
    """Generation"""

    max_new_tokens: int = opt(128, "longest answer in tokens (MSRA answers: ~11 on average)")
    batch_size: int = opt(128, "prompts decoded together in file mode (engine: KV-cache slots, fewer when GPU "
                          "memory is short)")
    engine: str = opt("auto", "auto: the continuous-batching engine (cnqlora.engine) for the models it supports "
                      "(LLaMA, Qwen2, Mistral, Baichuan-7B), transformers' generate for others and with "
                      "--repetition_penalty; hf: always transformers' generate", choices=("auto", "hf"))
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.2, "sampling temperature (with --do_sample)")
    top_k: int = opt(40, "sample among the k most likely tokens (with --do_sample)")
    top_p: float = opt(0.9, "nucleus sampling mass (with --do_sample)")
    repetition_penalty: float = opt(1.0, "1.0 = off; >1 discourages repeating tokens (it also discourages copying "
                                    "entities from the input)")
    seed: int = opt(42, "random seed for sampling")

    def validate(self) -> None:
        # Checked before any model loads: a zero batch size used to crash after loading, and a
        # negative one made zero batches, i.e. an empty predictions file and exit status 0.
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1.")
        if self.top_k < 0:
            raise UserError("--top_k must be at least 0 (0: no top-k limit).")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be greater than 0 and at most 1, got {self.top_p:g}.")
        if not self.temperature >= 0 or (self.do_sample and self.temperature == 0):
            raise UserError(f"--temperature must be greater than 0, got {self.temperature:g} (greedy decoding, "
                            "the default without --do_sample, needs no temperature).")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition_penalty must be greater than 0, got {self.repetition_penalty:g} "
                            "(1.0 = off).")


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer plus any end-of-turn ids the model's generation config names."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


class TextStream:
    """A generate() streamer that writes decoded text as soon as it is complete.

    Text is decoded from all tokens so far and only the new suffix is written, so multi-token
    characters (byte fallback) appear once whole, never as replacement characters.
    """

    def __init__(self, tokenizer, out: TextIO = sys.stdout, skip_prompt_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.skip = skip_prompt_tokens
        self.tokens: list[int] = []
        self.printed = ""

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:
            # generate() first passes the whole prompt
            taken = min(self.skip, len(ids))
            self.skip -= taken
            ids = ids[taken:]
        self.tokens.extend(ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        new = text[len(self.printed):] if text.startswith(self.printed) else text
        if new:
            self.out.write(new)
            self.out.flush()
        self.printed = text

    @property
    def text(self) -> str:
        return self.printed


def _generate_kwargs(args: GenerationArgs, tokenizer, model) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "eos_token_id": stop_token_ids(tokenizer, model),
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
        "num_beams": 1,
    }
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        # The model's generation_config may ship sampling values; they only warn under greedy.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt))
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def generate_ids(model, tokenizer, prompts: Sequence[Sequence[int]], args: GenerationArgs,
                 logits_processor_factory: Callable[[Any, int], Any] | None = None, streamer=None) -> list[list[int]]:
    """New token ids for a batch of prompt ids (left padded, one generate() call), EOS and padding removed."""
    import torch

    ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    kwargs = _generate_kwargs(args, tokenizer, model)
    if logits_processor_factory is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([logits_processor_factory(ids, args.max_new_tokens)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs)
    stops = set(kwargs["eos_token_id"])
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], args: GenerationArgs,
                   logits_processor_factory: Callable[[Any, int], Any] | None = None, streamer=None) -> list[str]:
    """Answers for a batch of prompt ids."""
    rows = generate_ids(model, tokenizer, prompts, args, logits_processor_factory, streamer)
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def engine_reason(model, args: GenerationArgs) -> str | None:
    """Why answer_many uses model.generate instead of the engine (None: it uses the engine)."""
    from .engine import supported

    if args.engine == "hf":
        return "--engine hf"
    if args.repetition_penalty != 1.0:
        return "--repetition_penalty is done by transformers' generate only"
    return supported(model)


def answer_many(model, tokenizer, prompts: Sequence[Sequence[int]], args: GenerationArgs,
                constraints: Sequence[Any] | None = None, on_answer: Callable[[int, str], None] | None = None,
                on_token: Callable[[int, int], None] | None = None, grounded_factory=None,
                engine_slots: int | None = None, stats: dict[str, Any] | None = None) -> list[str]:
    """Answers to many prompts: through the engine when it can run the model, else batched generate.

    This is the one way prediction files, chat, the dev F1 and the server decode. `on_answer(i, text)`
    is called as each answer is done (in no fixed order with the engine); `on_token(i, id)` streams.
    Grounded decoding comes as `constraints` (one grounded.GroundedAnswer per prompt) for the engine
    and as `grounded_factory(indices)` (a logits_processor_factory for those prompts) for generate.
    `engine_slots` overrides args.batch_size for the engine (its KV-cache slots), which decodes
    many rows for the price of few where generate's batches would run out of memory.
    `stats` (engine only) accumulates the engine's counters and seconds over calls.
    """
    answers: list[str | None] = [None] * len(prompts)
    if engine_reason(model, args) is None:
        from .engine import Engine, Request, Sampling, accumulate_stats

        engine = Engine(model, stop_token_ids(tokenizer, model), tokenizer.pad_token_id,
                        max_batch=engine_slots or args.batch_size,
                        sampling=Sampling(args.do_sample, args.temperature, args.top_k, args.top_p))
        requests = [Request(p, args.max_new_tokens, constraints[i] if constraints else None)
                    for i, p in enumerate(prompts)]
        for index, tokens in engine.run(requests, on_token):
            answers[index] = tokenizer.decode(tokens, skip_special_tokens=True)
            if on_answer is not None:
                on_answer(index, answers[index])
        if stats is not None:
            accumulate_stats(stats, engine.last_stats)
        return answers  # type: ignore[return-value]
    for window in length_sorted_batches([len(p) for p in prompts], args.batch_size, window=len(prompts)):
        for batch in window:
            factory = grounded_factory(batch) if grounded_factory is not None else None
            streamer = _IndexedStream(batch[0], on_token) if on_token is not None and len(batch) == 1 else None
            for index, text in zip(batch, generate_batch(model, tokenizer, [prompts[i] for i in batch], args,
                                                         factory, streamer)):
                answers[index] = text
                if on_answer is not None:
                    on_answer(index, text)
    return answers  # type: ignore[return-value]


class _IndexedStream:
    """A generate() streamer that hands new token ids to an engine-style on_token(index, id)."""

    def __init__(self, index: int, on_token: Callable[[int, int], None]) -> None:
        self.index, self.on_token, self.prompt_seen = index, on_token, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the whole prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(self.index, token)

    def end(self) -> None:
        pass


def length_sorted_batches(lengths: Sequence[int], batch_size: int, window: int) -> Iterator[list[list[int]]]:
    """Windows of consecutive indices, each cut into batches of similar prompt length.

    Sorting within a window rather than over the whole file keeps most of the padding saving
    while letting results be written in input order after every window.
    """
    for start in range(0, len(lengths), window):
        indices = sorted(range(start, min(start + window, len(lengths))), key=lambda i: lengths[i])
        yield [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
