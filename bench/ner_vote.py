"""How much of each run's errors is its own: an entity-level vote over several runs' predictions.

    python bench/ner_vote.py RUN1/test.plain.jsonl RUN2/test.plain.jsonl RUN3/test.plain.jsonl \
        --types 人名,地名,机构名 [--min_votes 2] [--out voted.jsonl]

The files are predict.py's --predictions_file for the same data file (same inputs, same order).
For every record the vote keeps the (entity, type) pairs that at least --min_votes files answer
(default: more than half of them), and is scored as predict.py scores (cnqlora.evaluation). It
prints each file's micro P/R/F1 and the vote's. When the vote scores well above the files, their
errors are mostly their own (seed noise), which is what averaging the adapters
(`predict.py --average_adapters`) can remove at the cost of one model; the vote itself needs one
model per file at inference, so it is an analysis here, not a way to predict. --out writes the
vote as a predictions file, for bench/ner_errors.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ner_errors import inputs_match, micro, read_predictions, resolve_types  # noqa: E402

from cnqlora.metrics import NONE_ANSWER, parse_answer  # noqa: E402  (ner_errors put the repo on the path)


def vote(files: list[list[dict]], min_votes: int, types: list[str] | None) -> list[dict]:
    voted = []
    for rows in zip(*files):
        # the parser drops repeated pairs, so each file votes once per pair; Counter keeps the order
        # in which the files name them, so the vote reads like an answer
        counts = Counter(pair for row in rows for pair in parse_answer(row["output"], types).entities)
        kept = [pair for pair, n in counts.items() if n >= min_votes]
        output = "\n".join(f"{entity}_{etype}" for entity, etype in kept) or NONE_ANSWER
        voted.append(dict(rows[0], output=output))
    return voted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="predictions files of the same inputs (two or more)")
    parser.add_argument("--types", default="",
                        help="comma-separated entity types (default: those the references use, as predict.py)")
    parser.add_argument("--min_votes", type=int, default=None, help="files that must name a pair (default: a majority)")
    parser.add_argument("--out", default=None, help="write the vote here as a predictions file")
    args = parser.parse_args(argv)
    if len(args.predictions) < 2:
        parser.error("give two or more predictions files")
    files = [read_predictions(p) for p in args.predictions]
    for path, rows in zip(args.predictions[1:], files[1:]):
        if len(rows) != len(files[0]) or not inputs_match(files[0], rows):
            raise SystemExit(f"{path}: not predictions of the same inputs in the same order as {args.predictions[0]}")
    min_votes = args.min_votes or len(files) // 2 + 1
    if not 1 <= min_votes <= len(files):
        parser.error(f"--min_votes must be between 1 and {len(files)}")
    types = resolve_types(args.types, files[0])
    lines = ["| predictions | P | R | F1 |", "| --- | --- | --- | --- |"]
    scored = [(path, micro(rows, types)) for path, rows in zip(args.predictions, files)]
    voted = vote(files, min_votes, types)
    scored.append((f"vote, {min_votes} of {len(files)}", micro(voted, types)))
    for name, m in scored:
        lines.append(f"| {name} | {100 * m['precision']:.2f} | {100 * m['recall']:.2f} | {100 * m['f1']:.2f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in voted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
