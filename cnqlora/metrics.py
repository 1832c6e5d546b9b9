"""Entity-level NER metrics for generated answers.

Answer format
-------------
The model is trained to answer with one ``entity_type`` line per entity, lines joined by
"\\n" (for example ``"日_地名\\n京_地名\\n北京_地名"``), or with
exactly ``没有`` when the sentence has no entity. References use the same format and go through
the same parser.

Parsing rules (``parse_answer``)
--------------------------------
- Surrounding whitespace of the whole text and of each line is stripped; empty lines are
  ignored. Any line break counts ("\\r\\n" included), so CRLF files parse like LF files.
- The whole text ``没有`` is the empty set and well formed.
- A line parses when it contains "_" with a non-empty entity before the LAST "_" and a
  non-empty type after it, so an entity may itself contain "_" ("A_B_机构名" is entity "A_B").
  Nothing else is stripped: "北京 _地名" is the entity "北京 ".
- When ``types`` is given, a line whose type is not one of them does not parse.
- Lines that do not parse go to ``bad_lines`` and contribute no entity.
- An answer is well formed iff it is ``没有``, or it has at least one line and every line
  parses. ``没有`` mixed with entity lines is not well formed (the ``没有`` line is a bad line);
  an empty answer is not well formed and is the empty set.
- Entities are (entity, type) pairs, deduplicated, in order of first appearance. The same
  string under two types is two pairs.

Scoring conventions (``NerScorer`` / ``ner_metrics``)
-----------------------------------------------------
- Counts are over deduplicated (entity, type) pairs per record: a pair predicted twice is one
  true or false positive, a pair listed twice in the reference is one gold entity.
- precision = tp / (tp + fp), recall = tp / (tp + fn), f1 = 2tp / (2tp + fp + fn) (the harmonic
  mean of the two). Any 0/0 is 0.0, as in conlleval and seqeval, including when there are no
  predicted and no gold entities at all: a set of all-``没有`` records scores P = R = F1 = 0.0
  (``exact_match`` is where such records show up as correct).
- ``per_type``: one row per type in ``types`` (in the given order) when given, else per type
  seen in the scored references or predictions (sorted). With ``types``, predicted lines of
  other types are bad lines and never count; without ``types`` an unknown type is a false
  positive under its own row.
- ``exact_match``: share of scored records whose predicted set equals the reference set (sets
  only: a malformed prediction whose parseable lines give exactly the reference set matches).
- ``unparseable``: share of all predictions, scored or not, that are not well formed.
- ``not_in_text``: share of predicted pairs whose entity string is not a substring of the
  record's input text, over the records added with a text (scored or not); null when no
  record had a text. ``not_in_text_count`` is the number of such pairs (null likewise).
- A record added with ``reference=None`` counts in ``records``, ``records_without_reference``,
  ``unparseable`` and ``not_in_text`` only. An empty reference string is a scored record with
  no gold entity (and counts in ``references_not_well_formed``).
- Every share over zero items is 0.0.

All values in the result are fractions in [0, 1] (not percent), ints or None, so the result
dumps to JSON as is.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "NONE_ANSWER",
    "ParsedAnswer",
    "parse_answer",
    "NerScorer",
    "ner_metrics",
    "format_metrics",
    "metric_value",
    "METRIC_NAMES",
    "ERROR_KINDS",
    "error_kinds",
    "answer_entities",
]

NONE_ANSWER = "没有"

Pair = tuple[str, str]


@dataclass
class ParsedAnswer:
    entities: list[Pair] = field(default_factory=list)
    well_formed: bool = False
    bad_lines: list[str] = field(default_factory=list)


def _check_types(types: Collection[str] | None) -> frozenset[str] | None:
    if types is None:
        return None
    # A bare string is a Collection[str] of its characters: "地名" would quietly become
    # {"地", "名"}.
    if isinstance(types, str):
        raise TypeError(f"types must be a collection of type names, not the string {types!r}")
    checked = frozenset(types)
    if not checked:
        raise ValueError(
            "types is empty, so no entity could ever parse; pass None to accept any type"
        )
    for t in checked:
        if not isinstance(t, str) or not t:
            raise ValueError(f"entity types must be non-empty strings, got {t!r}")
        # Lines split at the last "_", so such a type could never be read back.
        if "_" in t:
            raise ValueError(
                f"entity type {t!r} contains '_', which the answer format cannot express"
            )
    return checked


def _parse(text: str, types: frozenset[str] | None) -> ParsedAnswer:
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if stripped == NONE_ANSWER:
        return ParsedAnswer(entities=[], well_formed=True, bad_lines=[])
    entities: list[Pair] = []
    seen: set[Pair] = set()
    bad: list[str] = []
    n_lines = 0
    for raw in stripped.splitlines():
        line = raw.strip()
        if not line:
            continue
        n_lines += 1
        entity, sep, etype = line.rpartition("_")
        if not sep or not entity or not etype or (types is not None and etype not in types):
            bad.append(line)
            continue
        pair = (entity, etype)
        if pair not in seen:
            seen.add(pair)
            entities.append(pair)
    return ParsedAnswer(entities=entities, well_formed=n_lines > 0 and not bad, bad_lines=bad)


def parse_answer(text: str, types: Collection[str] | None = None) -> ParsedAnswer:
    """Parse one prediction or reference; the rules are in the module docstring."""
    return _parse(text, _check_types(types))


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _prf(tp: int, fp: int, fn: int) -> dict:
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


class NerScorer:
    """Accumulates records one at a time, so evaluation can score while it generates."""

    def __init__(self, types: Collection[str] | None = None) -> None:
        self._types = _check_types(types)
        # Keep the caller's order for the per-type rows; frozenset has none.
        self._type_order: list[str] | None = None if types is None else list(dict.fromkeys(types))
        self._tp: dict[str, int] = {}
        self._fp: dict[str, int] = {}
        self._fn: dict[str, int] = {}
        self._records = 0
        self._without_reference = 0
        self._exact = 0
        self._unparseable = 0
        self._bad_references = 0
        self._checked_entities = 0
        self._not_in_text = 0
        self._had_text = False

    def add(self, prediction: str, reference: str | None = None, text: str | None = None) -> None:
        pred = _parse(prediction, self._types)
        self._records += 1
        if not pred.well_formed:
            self._unparseable += 1
        if text is not None:
            self._had_text = True
            for entity, _ in pred.entities:
                self._checked_entities += 1
                if entity not in text:
                    self._not_in_text += 1
        if reference is None:
            self._without_reference += 1
            return
        gold = _parse(reference, self._types)
        if not gold.well_formed:
            self._bad_references += 1
        pred_set, gold_set = set(pred.entities), set(gold.entities)
        if pred_set == gold_set:
            self._exact += 1
        for _, etype in pred_set & gold_set:
            self._tp[etype] = self._tp.get(etype, 0) + 1
        for _, etype in pred_set - gold_set:
            self._fp[etype] = self._fp.get(etype, 0) + 1
        for _, etype in gold_set - pred_set:
            self._fn[etype] = self._fn.get(etype, 0) + 1

    def result(self) -> dict:
        if self._type_order is not None:
            type_rows = self._type_order
        else:
            type_rows = sorted(set(self._tp) | set(self._fp) | set(self._fn))
        per_type = {}
        for t in type_rows:
            tp, fp, fn = self._tp.get(t, 0), self._fp.get(t, 0), self._fn.get(t, 0)
            per_type[t] = {**_prf(tp, fp, fn), "support": tp + fn}
        scored = self._records - self._without_reference
        return {
            "micro": _prf(sum(self._tp.values()), sum(self._fp.values()), sum(self._fn.values())),
            "per_type": per_type,
            "exact_match": _ratio(self._exact, scored),
            "unparseable": _ratio(self._unparseable, self._records),
            "unparseable_count": self._unparseable,
            "not_in_text": (
                _ratio(self._not_in_text, self._checked_entities) if self._had_text else None
            ),
            "not_in_text_count": self._not_in_text if self._had_text else None,
            "records": self._records,
            "records_without_reference": self._without_reference,
            "references_not_well_formed": self._bad_references,
        }


def answer_entities(answers: Iterable[str], types: Collection[str] | None = None) -> set[Pair]:
    """Every (entity, type) pair that any of the answers names."""
    checked = _check_types(types)
    return {pair for answer in answers for pair in _parse(answer, checked).entities}


ERROR_KINDS = {
    "wrong_type": "right span, wrong type",
    "too_long": "span too long (contains a reference entity of its type)",
    "too_short": "span too short (inside a reference entity of its type)",
    "nested_other_type": "nested with a reference entity of another type",
    "spurious": "spurious: no reference entity shares a string with it",
    "missed": "missed: no predicted entity shares a string with it",
}


def error_kinds(prediction: str, reference: str, types: Collection[str] | None = None) -> dict[str, int]:
    """Why one record's (entity, type) pairs disagree, as counts of the ERROR_KINDS.

    Each false positive gets the first kind that fits, in the order of ERROR_KINDS, judged
    against the record's missed reference pairs; "nested" means one string contains the other
    (the answers carry no offsets). A missed pair that no false positive was judged against is
    `missed`, counted per type as `missed:<type>` too.
    """
    checked = _check_types(types)
    pred, gold = set(_parse(prediction, checked).entities), set(_parse(reference, checked).entities)
    false_pos, missed = sorted(pred - gold), sorted(gold - pred)
    counts: dict[str, int] = {}
    explained: set[Pair] = set()

    def count(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    for entity, etype in false_pos:
        nested = [g for g in missed if entity in g[0] or g[0] in entity]
        same_string = [g for g in nested if g[0] == entity]
        same_type = [g for g in nested if g[1] == etype]
        if same_string:
            kind, partner = "wrong_type", same_string[0]
        elif same_type:
            partner = same_type[0]
            kind = "too_long" if partner[0] in entity else "too_short"
        elif nested:
            kind, partner = "nested_other_type", nested[0]
        else:
            count("spurious")
            continue
        count(kind)
        explained.add(partner)
    for _, etype in (g for g in missed if g not in explained):
        count("missed")
        count(f"missed:{etype}")
    return counts


def ner_metrics(
    predictions: Sequence[str],
    references: Sequence[str | None],
    texts: Sequence[str | None] | None = None,
    types: Collection[str] | None = None,
) -> dict:
    """Score whole lists at once; same result as feeding a NerScorer record by record."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if texts is not None and len(texts) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(texts)} texts")
    scorer = NerScorer(types)
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        scorer.add(pred, ref, None if texts is None else texts[i])
    return scorer.result()


def _width(s: str) -> int:
    # Chinese type names take two terminal columns each; str.ljust would misalign the table.
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in s)


def _pad(s: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - _width(s))
    return fill + s if right else s + fill


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_metrics(result: dict) -> str:
    """A fixed-width table (percent, 2 decimals) for a terminal or a README code block."""
    header = ["type", "precision", "recall", "f1", "support", "tp", "fp", "fn"]
    rows = []
    for name, m in result["per_type"].items():
        rows.append([name, _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]),
                     str(m["support"]), str(m["tp"]), str(m["fp"]), str(m["fn"])])
    mi = result["micro"]
    rows.append(["micro", _pct(mi["precision"]), _pct(mi["recall"]), _pct(mi["f1"]),
                 str(mi["tp"] + mi["fn"]), str(mi["tp"]), str(mi["fp"]), str(mi["fn"])])
    widths = [max(_width(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(_pad(c, w, right=i > 0) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[:-1]]
    if rows[:-1]:
        out.append("  ".join("-" * w for w in widths))
    out.append(line(rows[-1]))

    scored = result["records"] - result["records_without_reference"]
    out.append("")
    out.append(f"exact match  {_pct(result['exact_match'])}%  ({scored} scored records)")
    out.append(f"unparseable  {_pct(result['unparseable'])}%  "
               f"({result['unparseable_count']} of {result['records']} predictions)")
    if result["not_in_text"] is None:
        out.append("not in text  n/a (no input texts)")
    else:
        out.append(f"not in text  {_pct(result['not_in_text'])}%  "
                   f"({result['not_in_text_count']} predicted entities missing from their input)")
    if result["records_without_reference"]:
        out.append(f"records without reference: {result['records_without_reference']} (not scored)")
    return "\n".join(out)


_MICRO_FIELDS = ("precision", "recall", "f1", "tp", "fp", "fn")
_TOP_FIELDS = (
    "exact_match",
    "unparseable",
    "unparseable_count",
    "not_in_text",
    "not_in_text_count",
    "records",
    "records_without_reference",
    "references_not_well_formed",
)
METRIC_NAMES: tuple[str, ...] = (
    *_MICRO_FIELDS,
    *(f"micro_{f}" for f in _MICRO_FIELDS),
    *_TOP_FIELDS,
)


def metric_value(result: dict, name: str) -> float | int:
    """One number from a result, by name, e.g. "f1" (= "micro_f1") to pick the best checkpoint.

    Raises KeyError for an unknown name, and for not_in_text(_count) when the result has no
    value for it (no input texts), since a None cannot be compared across checkpoints.
    """
    key = name.removeprefix("micro_")
    if key in _MICRO_FIELDS:
        return result["micro"][key]
    if name in _TOP_FIELDS:
        value = result[name]
        if value is None:
            raise KeyError(f"metric {name!r} has no value in this result (it needs input texts)")
        return value
    raise KeyError(f"unknown metric {name!r}; valid names: {', '.join(METRIC_NAMES)}")
