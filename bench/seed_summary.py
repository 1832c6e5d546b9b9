"""One recipe over several seeds: each run's best dev F1 and test F1, then their mean and spread.

    python bench/seed_summary.py RUN_DIR [RUN_DIR ...] [--json summary.json]

A RUN_DIR is what `bench/msra_qwen_gpu.sh` returns for one run: `metrics.jsonl` (the dev F1
rows training logs), `test.plain.metrics.json` / `test.grounded.metrics.json` (predict.py
--metrics_file) and, from `test RUN dev`, `dev.plain.metrics.json` (all of dev.txt, which also
scores an averaged adapter that was never trained and so has no metrics.jsonl). A run without one of them leaves that cell empty and out of that column's mean.
One run's score says little when seeds alone move test F1 by a point, so a recipe is judged by
the mean, and the sample standard deviation says how far one run may fall from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnqlora.evaluation import best_so_far  # noqa: E402

COLUMNS = ("dev_f1", "full_dev_f1", "plain_p", "plain_r", "plain_f1", "grounded_f1")


def _load_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def best_dev(run_dir: str) -> tuple[float, int] | None:
    """(best dev F1 in percent, its step) from training's metrics.jsonl; None if it has none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON ({e.msg}); is the file cut short?") from None
    # the same choice training made when it kept best_adapter
    best, step = best_so_far(rows)
    return None if step == 0 else (100 * best, step)


def run_row(run_dir: str) -> dict:
    row: dict = {"run": os.path.basename(os.path.normpath(run_dir))}
    dev = best_dev(run_dir)
    if dev is not None:
        row["dev_f1"], row["dev_step"] = dev
    plain = _load_json(os.path.join(run_dir, "test.plain.metrics.json"))
    if plain is not None:
        for key, name in (("precision", "plain_p"), ("recall", "plain_r"), ("f1", "plain_f1")):
            row[name] = 100 * plain["micro"][key]
    for name, column in (("test.grounded", "grounded_f1"), ("dev.plain", "full_dev_f1")):
        scored = _load_json(os.path.join(run_dir, f"{name}.metrics.json"))
        if scored is not None:
            row[column] = 100 * scored["micro"]["f1"]
    return row


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no spread from a single run."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: list[dict]) -> dict:
    out = {}
    for column in COLUMNS:
        values = [r[column] for r in rows if column in r]
        if values:
            mean, sd = mean_and_sd(values)
            out[column] = {"n": len(values), "mean": mean, "sd": sd, "min": min(values), "max": max(values)}
    return out


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def table(rows: list[dict], summary: dict) -> str:
    lines = ["| run | best dev F1 (step) | dev F1, all of dev.txt | test P | test R | test F1 plain | grounded |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        dev = f"{r['dev_f1']:.2f} ({r['dev_step']})" if "dev_f1" in r else ""
        lines.append(f"| {r['run']} | {dev} | {_cell(r.get('full_dev_f1'))} | {_cell(r.get('plain_p'))} | "
                     f"{_cell(r.get('plain_r'))} | "
                     f"{_cell(r.get('plain_f1'))} | {_cell(r.get('grounded_f1'))} |")
    lines.append("| runs | " + " | ".join(str(summary[c]["n"]) if c in summary else "0" for c in COLUMNS) + " |")
    for stat in ("mean", "sd", "min", "max"):
        cells = [_cell(summary[c][stat]) if c in summary else "" for c in COLUMNS]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (metrics.jsonl, test.*.metrics.json)")
    parser.add_argument("--json", help="also write the rows and the summary here")
    args = parser.parse_args(argv)
    missing = [d for d in args.runs if not os.path.isdir(d)]
    if missing:
        print(f"not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [run_row(d) for d in args.runs]
    summary = summarize(rows)
    print(table(rows, summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": rows, "summary": summary}, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
