"""Task metrics on the dev set during training: generate answers, score them, keep the best adapter.

The dev loss says how well the model predicts the reference tokens; what a user cares about is
whether the generated answers are right. Every `eval_f1_steps` the model answers a fixed sample
of dev records with the same greedy decoding as predict.py (the engine), `metrics.ner_metrics`
scores them, and the adapter with the best dev F1 so far is kept in `<run>/best_adapter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data import encode_prompt
from .generation import GenerationArgs, answer_many
from .grounded import allowed_types_from_answers, ner_text_from_query
from .metrics import ner_metrics


def score_answers(predictions: Sequence[str], references: Sequence[str], prompts: Sequence[tuple[str, str]],
                  types: list[str] | None = None) -> dict[str, Any]:
    """`ner_metrics` of answers to (instruct, query) prompts, entities checked against each query's sentence.

    `types` default: those the references use (None, i.e. any, when they use none).
    """
    types = types or allowed_types_from_answers(references) or None
    return ner_metrics(predictions, references,
                       texts=[ner_text_from_query(query or instruct) for instruct, query in prompts], types=types)


class DevNerEvaluator:
    """Scores a model's greedy answers on dev records (entity-level P/R/F1 and format checks)."""

    def __init__(self, tokenizer, template: str, records: list[dict[str, Any]], types: list[str] | None = None,
                 batch_size: int = 64, max_new_tokens: int = 96, engine_slots: int = 256, world=None) -> None:
        """`types`: those of the training answers when known; default: those of the dev answers.

        `batch_size` is for transformers' generate; the engine decodes `engine_slots` answers at
        once (fewer when the GPU's free memory is short: it sizes its cache from what is free).
        `world`: a `distributed.World` of several ranks: each answers every size-th record and the
        answers are gathered, so every rank returns the same scores.
        """
        self.world = world
        self.tokenizer = tokenizer
        self.records = records
        self.types = types
        self.prompts = [encode_prompt(tokenizer, template, r["instruct"], r["query"]).ids for r in records]
        self.gen = GenerationArgs(max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.engine_slots = engine_slots

    def __call__(self, model) -> dict[str, Any]:
        world = self.world
        size, rank = (world.size, world.rank) if world is not None and world.distributed else (1, 0)
        was_training = model.training
        model.eval()
        try:
            mine = answer_many(model, self.tokenizer, self.prompts[rank::size], self.gen,
                               engine_slots=self.engine_slots)
        finally:
            if was_training:
                model.train()
        if size > 1:
            shares = world.gather(mine, "gathering the dev answers")
            predictions = [shares[i % size][i // size] for i in range(len(self.prompts))]
        else:
            predictions = mine
        return score_answers(predictions, [r["answer"] for r in self.records],
                             [(r["instruct"], r["query"]) for r in self.records], self.types)


def dev_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a TensorBoard curve."""
    micro = result["micro"]
    return {"dev_f1": micro["f1"], "dev_precision": micro["precision"], "dev_recall": micro["recall"],
            "dev_exact_match": result["exact_match"], "dev_unparseable": result["unparseable"]}


def best_so_far(history: list[dict[str, Any]]) -> tuple[float, int]:
    """(best dev F1, its step) in a run's logged history; (-1, 0) when there is none yet."""
    best, step = -1.0, 0
    for entry in history:
        if "dev_f1" in entry and entry["dev_f1"] > best:
            best, step = entry["dev_f1"], entry["step"]
    return best, step
