"""Host (CPU) cost of grounded decoding in the engine, without a model or a GPU.

Builds each record's GroundedAnswer as `predict.py --grounded` does, then feeds it the answer
tokens of an earlier predictions file (plain decoding's own answers, + EOS) through `permits`
and `advance`, as the engine checks every greedy token; at the first refused token of a record
it stops, as the engine would rewind. Prints the seconds of the per-process context (token byte
table), of the answers' construction and of the token walk, twice (the second run without the
context: it is cached per tokenizer).

    python bench/grounded_host_cost.py --tokenizer /path/to/qwen-hf --predictions test.plain.jsonl \\
        --types 人名,地名,机构名 --max_new_tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnqlora.grounded import GroundedAnswer, ner_text_from_query  # noqa: E402


def walk(tokenizer, records: list[dict], types: list[str], max_new_tokens: int, eos: int, vocab: int) -> dict:
    started = time.perf_counter()
    shared: dict = {}
    answers = [GroundedAnswer(tokenizer, ner_text_from_query(r["input"] or r["instruct"]), types, max_new_tokens,
                              eos_token_id=eos, shared=shared) for r in records]
    built = time.perf_counter()
    sequences = [tokenizer.encode(r["output"], add_special_tokens=False)[:max_new_tokens - 1] + [eos]
                 for r in records]
    encoded = time.perf_counter()
    refused = tokens = 0
    for answer, ids in zip(answers, sequences):
        for k, token in enumerate(ids):
            tokens += 1
            if not answer.permits(token, k, vocab):
                refused += 1
                break
            answer.advance(token)
    done = time.perf_counter()
    return {"construct_s": built - started, "walk_s": done - encoded, "tokens": tokens, "refused": refused,
            "automata_built": sum(a._full is not None for a in answers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (the model's)")
    parser.add_argument("--predictions", required=True, help="a predictions JSONL of predict.py (input, output)")
    parser.add_argument("--types", default="人名,地名,机构名")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--eos", default=None, help="EOS token (default: the tokenizer's, or <|im_end|> if it has one)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    eos_name = args.eos or ("<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else None)
    eos = tokenizer.convert_tokens_to_ids(eos_name) if eos_name else tokenizer.eos_token_id
    with open(args.predictions, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    types = [t for t in args.types.split(",") if t]
    vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    for label in ("first (with the tokenizer context)", "again (context cached)"):
        r = walk(tokenizer, records, types, args.max_new_tokens, eos, vocab)
        print(f"{label}: {len(records)} answers built in {r['construct_s']:.3f} s; {r['tokens']} tokens checked "
              f"and advanced in {r['walk_s']:.3f} s ({1e6 * r['walk_s'] / max(1, r['tokens']):.1f} us each); "
              f"{r['refused']} refused; {r['automata_built']} automata built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
