"""What a predictions file gets wrong: error kinds, and how much the entity-dense sentences cost.

    python bench/ner_errors.py checkpoint/msra_qwen0.5b/test.predictions.jsonl
    python bench/ner_errors.py PRED.jsonl --types 人名,地名,机构名 --dense 10 --examples 3

Reads predict.py's JSON Lines output (`input`, `output`, `reference`) and prints:
- the micro P/R/F1 that predict.py prints (cnqlora.evaluation.score_answers; without --types, over
  the entity types the references use, as predict.py scores);
- every false or missed (entity, type) pair by kind (cnqlora.metrics.error_kinds);
- the sentences with at least --dense reference entities (in MSRA mostly lists of names with
  no separators): their share of the errors and the F1 of the rest;
- with --train FILE (the training data, read as training reads it), the share of reference
  entities that occur in the training answers and the recall of seen and unseen ones;
- with --examples K, the first K records showing each kind;
- with --same_as OTHER.jsonl (predictions of the same inputs, e.g. from another machine or a
  merged model), how many outputs are identical to OTHER's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnqlora.data import load_records  # noqa: E402
from cnqlora.evaluation import score_answers  # noqa: E402
from cnqlora.grounded import allowed_types_from_answers  # noqa: E402
from cnqlora.metrics import ERROR_KINDS, answer_entities, error_kinds, parse_answer  # noqa: E402


def read_predictions(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("reference") is None:
                raise SystemExit(f"{path}:{number}: no reference; error kinds need the expected answer")
            rows.append(row)
    return rows


def micro(rows: list[dict], types: list[str] | None) -> dict:
    return score_answers([r["output"] for r in rows], [r["reference"] for r in rows],
                         [(r.get("instruct", ""), r.get("input", "")) for r in rows], types)["micro"]


def analyse(rows: list[dict], types: list[str] | None, dense: int) -> dict:
    totals: dict[str, int] = {}
    per_row = []
    for row in rows:
        kinds = error_kinds(row["output"], row["reference"], types)
        per_row.append(kinds)
        for kind, n in kinds.items():
            totals[kind] = totals.get(kind, 0) + n
    is_dense = [len(parse_answer(r["reference"], types).entities) >= dense for r in rows]
    dense_rows = [r for r, d in zip(rows, is_dense) if d]
    other_rows = [r for r, d in zip(rows, is_dense) if not d]
    all_micro = micro(rows, types)
    dense_micro = micro(dense_rows, types) if dense_rows else {"tp": 0, "fp": 0, "fn": 0, "f1": None}
    return {
        "records": len(rows), "micro": all_micro, "kinds": totals, "per_row": per_row,
        "dense": {"threshold": dense, "records": len(dense_rows), "gold": dense_micro["tp"] + dense_micro["fn"],
                  "fp": dense_micro["fp"], "fn": dense_micro["fn"], "f1": dense_micro["f1"],
                  # a list the model gave up on: `没有` (or nothing parseable) for 10+ entities
                  "empty": sum(not parse_answer(r["output"], types).entities for r in dense_rows),
                  "f1_without": micro(other_rows, types)["f1"] if other_rows else None},
    }


def seen_in_training(rows: list[dict], types: list[str] | None, train_file: str) -> dict:
    """Recall of the reference entities that occur in the training answers, and of the others."""
    # Bad records are skipped, not fatal: a run with --skip_bad_lines trained on the rest only.
    seen = answer_entities((r["answer"] for r in load_records(train_file, skip_bad_lines=True)), types)
    counts = {"seen": [0, 0], "unseen": [0, 0]}  # [reference entities, found]
    for row in rows:
        predicted = set(parse_answer(row["output"], types).entities)
        for pair in set(parse_answer(row["reference"], types).entities):
            bucket = counts["seen" if pair in seen else "unseen"]
            bucket[0] += 1
            bucket[1] += pair in predicted
    return {k: {"reference": n, "found": hit, "recall": hit / n if n else 0.0} for k, (n, hit) in counts.items()}


def resolve_types(types_arg: str, rows: list[dict]) -> list[str] | None:
    """--types, or as predict.py's score_predictions: the types the references use."""
    return ([t for t in types_arg.split(",") if t]
            or allowed_types_from_answers(r["reference"] for r in rows) or None)


def inputs_match(rows: list[dict], other: list[dict]) -> bool:
    """Whether `other` starts with predictions of the same inputs as `rows`, in the same order."""
    return [r.get("input") for r in other[:len(rows)]] == [r.get("input") for r in rows]


def identical_outputs(rows: list[dict], other_path: str) -> str:
    """How many outputs equal those of another predictions file of the same inputs, in the same order."""
    other = read_predictions(other_path)
    if not inputs_match(rows, other):
        raise SystemExit(f"{other_path}: not predictions of the same inputs in the same order; compare files of one "
                         "data file (cut the longer one to the length of the shorter)")
    same = sum(a["output"] == b["output"] for a, b in zip(rows, other))
    return f"{same} of {len(rows)} outputs identical to {other_path}'s"


def report(result: dict, rows: list[dict], examples: int) -> str:
    m = result["micro"]
    lines = [f"{result['records']} records: P {100 * m['precision']:.2f} R {100 * m['recall']:.2f} "
             f"F1 {100 * m['f1']:.2f} ({m['fp']} false, {m['fn']} missed entities)", "",
             "| kind | count |", "| --- | --- |"]
    kinds = result["kinds"]
    for key, label in ERROR_KINDS.items():
        lines.append(f"| {label} | {kinds.get(key, 0)} |")
    for key in sorted(k for k in kinds if k.startswith("missed:")):
        lines.append(f"| missed {key.split(':', 1)[1]} | {kinds[key]} |")
    d = result["dense"]
    lines.append("")
    lines.append(f"{d['records']} records with >= {d['threshold']} reference entities hold {d['gold']} of "
                 f"{m['tp'] + m['fn']}; they have {d['fn']} of the {m['fn']} misses and {d['fp']} of the "
                 f"{m['fp']} false entities; {d['empty']} answered with no entity"
                 + (f"; their F1 {100 * d['f1']:.2f}" if d["f1"] is not None else "")
                 + (f"; F1 of the other records {100 * d['f1_without']:.2f}" if d["f1_without"] is not None else ""))
    if "seen" in result:
        seen, unseen = result["seen"]["seen"], result["seen"]["unseen"]
        total = seen["reference"] + unseen["reference"]
        lines.append(f"{seen['reference']} of {total} reference entities ({100 * seen['reference'] / max(1, total):.1f}%) "
                     f"occur in the training answers: recall {100 * seen['recall']:.2f} on those, "
                     f"{100 * unseen['recall']:.2f} on the {unseen['reference']} unseen ones")
    if examples:
        for key, label in ERROR_KINDS.items():
            shown = [r for r, k in zip(rows, result["per_row"]) if k.get(key)][:examples]
            if shown:
                lines.append(f"\n{label}:")
                for r in shown:
                    lines.append(f"  {r.get('input', '')}\n    output:    {r['output']!r}\n    reference: {r['reference']!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="predict.py's --predictions_file (JSON Lines with references)")
    parser.add_argument("--types", default="",
                        help="comma-separated entity types (default: those the references use, as predict.py)")
    parser.add_argument("--dense", type=int, default=10, help="reference entities that make a record dense")
    parser.add_argument("--examples", type=int, default=0, help="records to show per error kind")
    parser.add_argument("--train", default=None, help="training file: recall of entities seen / unseen in training")
    parser.add_argument("--same_as", default=None,
                        help="another predictions file of the same inputs (its first records as many as these): "
                        "count the identical outputs")
    args = parser.parse_args(argv)
    rows = read_predictions(args.predictions)
    types = resolve_types(args.types, rows)
    result = analyse(rows, types, args.dense)
    if args.train:
        result["seen"] = seen_in_training(rows, types, args.train)
    print(report(result, rows, args.examples))
    if args.same_as:
        print(identical_outputs(rows, args.same_as))
    return 0


if __name__ == "__main__":
    sys.exit(main())
