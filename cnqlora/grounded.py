"""Grounded decoding for the NER task: a logits processor that only lets well-formed answers out.

The NER model answers either exactly ``没有`` (no entity) or one line ``ENTITY_TYPE`` per entity,
lines separated by "\\n", where ENTITY is a substring of the input text and TYPE one of a fixed
set. A model can still hallucinate entities, misspell types or get cut off mid-line by
``max_new_tokens``; this module makes all three impossible, so that every decoded answer parses
and every entity occurs in its text.

How it works, per batch row:

* ``token_byte_table`` gives, for every token id, the exact UTF-8 bytes it adds to the decoded
  text. Everything below runs on bytes, because byte-fallback and byte-level tokens routinely
  split a Chinese character in the middle.
* ``NerGrammar`` is a deterministic automaton over bytes for the answer grammar of one text: a
  suffix automaton of the text (linear size, recognises exactly its substrings), a trie of the
  types and the ``没有`` branch, determinised together (an entity may start with 没有).
* ``TokenTrie`` (built once per tokenizer and cached) holds the byte strings of all tokens; a joint
  walk of token trie and grammar automaton lists the allowed tokens while only ever visiting
  tokens compatible with the text, and a token may span entity end, "_", type, "\\n" and the next
  entity.
* Budget: for every automaton state we know how many tokens, at worst, are needed to reach an
  accepting state using "unit" tokens (single bytes or single characters). A token is allowed only
  if that number plus one (for EOS) still fits in the tokens left after it, so even a model with
  random weights, cut by ``max_new_tokens``, ends every row with a complete answer and EOS.

Usage (left-padded batch, greedy or sampling, ``num_beams=1``)::

    enc = tokenizer(prompts, return_tensors="pt", padding=True)  # padding_side="left"
    proc = GroundedNerLogitsProcessor(
        tokenizer, texts=[ner_text_from_query(q) for q in queries], types=types,
        prompt_length=enc["input_ids"].shape[1], max_new_tokens=64,
        eos_token_id=tokenizer.eos_token_id)
    out = model.generate(**enc, max_new_tokens=64, logits_processor=LogitsProcessorList([proc]))
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

``grounded_processor_factory`` builds the processor for ``generation.generate_batch``.

Beyond the bare answer format, entities may neither start nor end with whitespace nor contain
line-breaking characters (those ``str.splitlines`` splits on): answers then parse the same under
``metrics.parse_answer`` (which strips and splits lines) and survive decoders that strip a
leading space. The same entity may be listed twice (the parser deduplicates).

Limitations:

* Beam search is not supported (rows are reordered between steps); it is detected and refused.
  Processors that forbid EOS (``min_new_tokens``) can leave a row without any allowed token.
* The budget needs, from every state it lets the model reach, a path of "unit" tokens (single
  bytes or single whole characters). Byte-fallback SentencePiece (Baichuan, LLaMA) and byte-level
  BPE (Qwen2) have all 256 single-byte tokens. Without them, whole-character tokens are used, and
  tokens that end inside a character no unit token can finish are refused; if no answer at all
  can be guaranteed the constructor raises ValueError rather than guessing a safety margin.
* Decode answers with ``skip_special_tokens=True`` and without ``clean_up_tokenization_spaces``
  (off by default in transformers 5): the clean-up would rewrite " ," inside an entity.
* Tokenizers that are neither SentencePiece nor byte-level BPE get an approximate table (tokens
  decoded one by one) that is checked against the tokenizer's own decode and refused if wrong.
* Token ids at or above ``len(tokenizer)`` (padded embedding rows) are never allowed.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import LogitsProcessor

NOTHING = "没有"
SEPARATOR = "_"
NEWLINE = "\n"
QUERY_PREFIXES = ("文本：", "文本:")

_US = ord(SEPARATOR)
_NL = ord(NEWLINE)
_INF = 1 << 30

# ----------------------------------------------------------------------------------------------
# Small helpers for the training data format
# ----------------------------------------------------------------------------------------------


def ner_text_from_query(query: str) -> str:
    """The sentence an MSRA query is about: the query without its leading ``文本：`` prefix."""
    for prefix in QUERY_PREFIXES:
        if query.startswith(prefix):
            return query[len(prefix) :]
    return query


def allowed_types_from_answers(answers: Iterable[str]) -> list[str]:
    """Entity types used in training answers (``entity_type`` lines), in order of first use."""
    seen: dict[str, None] = {}
    for answer in answers:
        for line in answer.split(NEWLINE):
            line = line.strip()
            if not line or line == NOTHING:
                continue
            entity, sep, etype = line.rpartition(SEPARATOR)
            if sep and entity and etype:
                seen.setdefault(etype, None)
    return list(seen)


# ----------------------------------------------------------------------------------------------
# Token id -> bytes
# ----------------------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (char used in token strings -> raw byte).

    Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted, in byte
    order, to code points 256, 257, ... so that every token is a printable string.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    inverse: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            inverse[chr(byte)] = byte
        else:
            inverse[chr(256 + shifted)] = byte
            shifted += 1
    return inverse


def _drop_skipped_tokens(tokenizer, table: list[bytes | None]) -> None:
    """Set to None the special and added tokens that decode does not render as their bytes.

    `all_special_ids` is not a reliable guide: a converted LLaMA tokenizer lists its "\\n" piece
    there yet keeps it when decoding with skip_special_tokens=True, while eos/bos/pad vanish. So
    each candidate is decoded on its own, the way answers are decoded.
    """
    candidates = {int(i) for i in (tokenizer.all_special_ids or []) if i is not None}
    candidates.update(int(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    for tid in candidates:
        if not 0 <= tid < len(table) or table[tid] is None:
            continue
        expected = table[tid].decode("utf-8", errors="replace")
        got = tokenizer.decode([tid], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if got != expected and not (expected.startswith(" ") and got == expected[1:]):
            table[tid] = None


def _decoder_steps(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("decoders", []) for step in _decoder_steps(child)]
    return [node]


def _tokenizer_json(tokenizer) -> dict | None:
    """The parts of a `tokenizers` tokenizer's JSON that say how tokens become bytes: its decoder
    and its model's byte_fallback (serialising the whole tokenizer, merges included, and parsing
    it back takes ~0.4 s for a 150k vocabulary; the decoder alone, microseconds)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        decoder = backend.decoder
        return {"decoder": None if decoder is None else json.loads(decoder.__getstate__()),
                "model": {"byte_fallback": bool(getattr(backend.model, "byte_fallback", False))}}
    except (AttributeError, ValueError, TypeError):
        pass
    try:
        return json.loads(backend.to_str())
    except (ValueError, TypeError):
        return None


def byte_table_kind(tokenizer, spec: dict | None = None) -> str:
    """How token strings map to bytes: "sentencepiece", "sp_tokenizers", "byte_level" or "generic".

    "sentencepiece": the tokenizer has a SentencePiece ``sp_model`` (slow Baichuan/LLaMA style).
    "sp_tokenizers": a `tokenizers` model converted from SentencePiece ('▁' space, <0xAB> bytes).
    "byte_level": GPT-2/Qwen2 byte-level BPE (tokens spelled in the byte-level alphabet).
    "generic": none of these; tokens are decoded one by one (see ``token_byte_table``).
    """
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None and hasattr(sp, "IdToPiece") and hasattr(sp, "is_byte"):
        return "sentencepiece"
    spec = spec or _tokenizer_json(tokenizer)
    if spec is None:
        return "generic"
    steps = _decoder_steps(spec.get("decoder"))
    types = {step.get("type") for step in steps}
    if "ByteLevel" in types:
        return "byte_level"
    if (
        "ByteFallback" in types
        or "Metaspace" in types
        or spec.get("model", {}).get("byte_fallback")
    ):
        return "sp_tokenizers"
    if any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == "▁" for s in steps):
        return "sp_tokenizers"
    return "generic"


def _table_size(tokenizer) -> int:
    size = len(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if added:
        size = max(size, max(int(t) for t in added) + 1)
    return size


def _sentencepiece_table(tokenizer) -> list[bytes | None]:
    sp = tokenizer.sp_model
    table: list[bytes | None] = [None] * _table_size(tokenizer)
    for tid in range(min(sp.get_piece_size(), len(table))):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            continue
        piece = sp.IdToPiece(tid)
        if sp.is_byte(tid):
            table[tid] = bytes((int(piece[3:5], 16),))
        else:
            table[tid] = piece.replace("▁", " ").encode("utf-8")
    return table


def _tokenizers_table(tokenizer, kind: str, spec: dict | None) -> list[bytes | None]:
    spec = spec or {}
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    table: list[bytes | None] = [None] * max(
        _table_size(tokenizer), max(vocab.values(), default=-1) + 1
    )
    if kind == "byte_level":
        # Each alphabet character to the Latin-1 character of its byte, anything else below 512
        # to one that Latin-1 cannot encode (above 511 nothing is in the alphabet either).
        to_latin1 = {c: 0x1FF for c in range(512)}
        to_latin1.update((ord(ch), byte) for ch, byte in _byte_level_alphabet().items())
        for token, tid in vocab.items():
            try:
                table[tid] = token.translate(to_latin1).encode("latin-1")
            except UnicodeEncodeError:
                table[tid] = None  # not written in the byte-level alphabet: unknown decoding
        return table
    # SentencePiece converted to `tokenizers`: the decoder replaces the metaspace by a space and
    # turns <0xAB> pieces into raw bytes (when byte fallback is on).
    steps = _decoder_steps(spec.get("decoder"))
    space_char = "▁"
    for step in steps:
        if step.get("type") == "Metaspace":
            space_char = step.get("replacement", space_char)
        elif step.get("type") == "Replace" and step.get("content") == " ":
            space_char = step.get("pattern", {}).get("String", space_char)
    byte_fallback = any(s.get("type") == "ByteFallback" for s in steps) or bool(
        spec.get("model", {}).get("byte_fallback")
    )
    for token, tid in vocab.items():
        match = _BYTE_PIECE.match(token) if byte_fallback else None
        table[tid] = (
            bytes((int(match.group(1), 16),))
            if match
            else token.replace(space_char, " ").encode("utf-8")
        )
    return table


def _generic_table(tokenizer) -> list[bytes | None]:
    # Last resort: decode tokens one by one. Tokens that only make sense next to others (partial
    # characters, word-piece continuations) come out wrong or as U+FFFD and are left out.
    table: list[bytes | None] = [None] * _table_size(tokenizer)
    for tid in range(len(table)):
        text = tokenizer.decode([tid], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text and "\ufffd" not in text:
            table[tid] = text.encode("utf-8")
    return table


def token_byte_table(tokenizer) -> list[bytes | None]:
    """For every token id the UTF-8 bytes it contributes to ``tokenizer.decode``, or None.

    None marks special and added tokens (never generated inside an answer) and tokens whose bytes
    cannot be known. Handles SentencePiece tokenizers with an ``sp_model`` (Baichuan, slow LLaMA),
    `tokenizers` models converted from SentencePiece (fast LLaMA) and byte-level BPE (Qwen2,
    GPT-2); anything else falls back to decoding tokens one at a time (approximate).
    """
    # the tokenizer's JSON (a 150k vocabulary: ~0.5 s to write out and parse) is read once
    spec = None if getattr(tokenizer, "sp_model", None) is not None else _tokenizer_json(tokenizer)
    kind = byte_table_kind(tokenizer, spec)
    if kind == "sentencepiece":
        table = _sentencepiece_table(tokenizer)
    elif kind in ("byte_level", "sp_tokenizers"):
        table = _tokenizers_table(tokenizer, kind, spec)
    else:
        table = _generic_table(tokenizer)
    _drop_skipped_tokens(tokenizer, table)
    return table


def byte_table_mismatches(
    tokenizer, table: Sequence[bytes | None], id_lists: Iterable[Sequence[int]]
):
    """(ids, decoded, expected) for every id list whose decode differs from its table bytes.

    Decoders may drop one leading space (SentencePiece's dummy prefix); answers never start with
    one, so that difference is not reported.
    """
    bad = []
    for ids in id_lists:
        ids = list(ids)
        parts = [table[i] for i in ids]
        if any(p is None for p in parts):
            raise ValueError(f"token ids without bytes in the table: {ids}")
        expected = b"".join(parts).decode("utf-8", errors="replace")
        got = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if got != expected and not (expected.startswith(" ") and got == expected[1:]):
            bad.append((ids, got, expected))
    return bad


_PROBE = "文本：北京大学的张三去了上海。没有_人名\n地名 Abc_123 鱻龘𠀋"


def _check_table(tokenizer, table: list[bytes | None]) -> None:
    # A wrong table silently breaks the guarantee, so check it against the tokenizer's own
    # decode: a mixed probe text, and each printable ASCII single-byte token on its own (this
    # catches decoders that leave byte-fallback pieces as literal "<0x41>").
    lists = [tokenizer.encode(_PROBE, add_special_tokens=False)]
    lists += [
        [tid]
        for tid, data in enumerate(table)
        if data is not None and len(data) == 1 and 0x21 <= data[0] < 0x7F
    ]
    lists = [ids for ids in lists if all(0 <= i < len(table) and table[i] is not None for i in ids)]
    bad = byte_table_mismatches(tokenizer, table, lists)
    if bad:
        ids, got, expected = bad[0]
        raise ValueError(
            f"cannot map {type(tokenizer).__name__} tokens to bytes "
            f"({byte_table_kind(tokenizer)} rules): ids {ids[:12]} decode to {got!r} but their "
            f"bytes give {expected!r}. Grounded decoding needs a tokenizer whose decode is the "
            "concatenation of its tokens' bytes (byte-fallback pieces decoded to bytes)."
        )


# ----------------------------------------------------------------------------------------------
# Token trie
# ----------------------------------------------------------------------------------------------


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0  # continuation or invalid byte


def _is_unit(data: bytes) -> bool:
    """A single byte, or exactly one complete UTF-8 character."""
    return len(data) == 1 or (
        _utf8_length(data[0]) == len(data) and all(0x80 <= b < 0xC0 for b in data[1:])
    )


class TokenTrie:
    """Byte trie of all generable tokens of one tokenizer.

    Nodes are ints (root 0); one flat dict maps ``node << 8 | byte`` to the child, which keeps a
    150k-token vocabulary at a few tens of MB instead of one dict per node. The nodes are built
    when first needed (listing allowed tokens): checking the tokens a model chose needs only the
    byte table, and building them is most of a large vocabulary's setup (~1 s for Qwen's).
    """

    def __init__(self, table: Sequence[bytes | None]):
        self.table = list(table)
        self._kids: dict[int, int] | None = None
        self._ends: dict[int, list[int]] = {}
        self.num_nodes = 0
        # Unit tokens give the worst-case completion paths used by the budget.
        self.units = frozenset(data for data in self.table if data and _is_unit(data))
        self.missing_bytes = frozenset(b for b in range(256) if bytes((b,)) not in self.units)

    @property
    def kids(self) -> dict[int, int]:
        if self._kids is None:
            self._build()
        return self._kids

    @property
    def ends(self) -> dict[int, list[int]]:
        if self._kids is None:
            self._build()
        return self._ends

    def _build(self) -> None:
        kids: dict[int, int] = {}
        ends: dict[int, list[int]] = {}
        nodes = 1
        for tid, data in enumerate(self.table):
            if not data:
                continue
            node = 0
            for byte in data:
                key = node << 8 | byte
                child = kids.get(key)
                if child is None:
                    child = nodes
                    nodes += 1
                    kids[key] = child
                node = child
            ends.setdefault(node, []).append(tid)
        self._kids, self._ends, self.num_nodes = kids, ends, nodes


_TRIE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_trie(tokenizer) -> TokenTrie:
    """The (cached) token trie of `tokenizer`, built from its checked byte table."""
    try:
        cached = _TRIE_CACHE.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    table = token_byte_table(tokenizer)
    _check_table(tokenizer, table)
    trie = TokenTrie(table)
    try:
        _TRIE_CACHE[tokenizer] = (len(tokenizer), trie)
    except TypeError:
        pass  # not weak-referenceable: rebuilt on every call
    return trie


# ----------------------------------------------------------------------------------------------
# Suffix automaton and the answer grammar
# ----------------------------------------------------------------------------------------------


class SuffixAutomaton:
    """Suffix automaton of a byte string: recognises exactly its substrings, at most 2n states.

    ``endpos[v]`` is one end position (index of the last byte) shared by all strings of state v;
    the grammar reads character facts about the entity's last character from it.
    """

    def __init__(self, data: bytes):
        nxt: list[dict[int, int]] = [{}]
        link = [-1]
        length = [0]
        endpos = [-1]
        last = 0
        for i, byte in enumerate(data):
            cur = len(nxt)
            nxt.append({})
            link.append(0)
            length.append(length[last] + 1)
            endpos.append(i)
            p = last
            while p != -1 and byte not in nxt[p]:
                nxt[p][byte] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][byte]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:
                    clone = len(nxt)
                    nxt.append(dict(nxt[q]))
                    link.append(link[q])
                    length.append(length[p] + 1)
                    endpos.append(endpos[q])
                    while p != -1 and nxt[p].get(byte) == q:
                        nxt[p][byte] = clone
                        p = link[p]
                    link[q] = clone
                    link[cur] = clone
            last = cur
        self.next = nxt
        self.link = link
        self.length = length
        self.endpos = endpos

    def contains(self, sub: bytes) -> bool:
        state = 0
        for byte in sub:
            state = self.next[state].get(byte)
            if state is None:
                return False
        return True


def _breaks_line(ch: str) -> bool:
    return len(f"a{ch}b".splitlines()) > 1


def _check_types(types: Iterable[str]) -> list[str]:
    types = tuple(types) if not isinstance(types, tuple) else types
    try:
        return list(_type_trie(types)[0])
    except TypeError:  # unhashable entries: checked (and refused) below
        return list(_checked_types(types))


def _checked_types(types: Iterable[str]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for etype in types:
        if not isinstance(etype, str) or not etype or etype != etype.strip():
            raise ValueError(
                f"entity type {etype!r} must be a non-empty string without surrounding spaces"
            )
        if SEPARATOR in etype or any(_breaks_line(ch) for ch in etype):
            raise ValueError(f"entity type {etype!r} must not contain {SEPARATOR!r} or line breaks")
        out.setdefault(etype, None)
    if not out:
        raise ValueError("grounded decoding needs at least one entity type")
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _type_trie(types: tuple[str, ...]) -> tuple[tuple[str, ...], list[dict[int, int]], list[bool], list[int]]:
    """The checked types and their byte trie: children, ends, and per node the fewest bytes to a
    complete type. Shared (read-only) by the grammars of every text with these types."""
    checked = _checked_types(types)
    kids: list[dict[int, int]] = [{}]
    end: list[bool] = [False]
    for etype in checked:
        node = 0
        for byte in etype.encode("utf-8"):
            child = kids[node].get(byte)
            if child is None:
                child = len(kids)
                kids.append({})
                end.append(False)
                kids[node][byte] = child
            node = child
        end[node] = True
    # The trie's nodes are numbered parents first, so children are final before their parent is
    # reached backwards.
    need = [0 if e else _INF for e in end]
    for node in range(len(kids) - 1, -1, -1):
        for child in kids[node].values():
            need[node] = min(need[node], need[child] + 1)
    return checked, kids, end, need


_LINE, _TYPE, _AFTER_NL = 0, 1, 2


class NerGrammar:
    """Deterministic byte automaton of the NER answers of one text.

    States are ints; ``start`` is the initial state, ``step``/``feed`` return -1 on a rejected
    byte, ``accepting[s]`` says whether EOS may follow. Internally a state is one of
      (LINE, sam_state, first_char_pending, nothing_progress)  inside an entity and/or 没有,
      (TYPE, trie_node)                                         inside a type,
      (AFTER_NL,)                                               after "\\n" (accepting),
    where a dead entity branch has sam_state -1 and a dead 没有 branch progress -1. Entities start
    and end on character boundaries, have no whitespace at either end and no "_" or line breaks.
    Transitions into states from which no accepting state is reachable are removed.
    """

    START_KEY = (_LINE, 0, 1, 0)

    def __init__(self, text: str, types: Iterable[str], build: bool = True):
        self.text = text
        self.data = text.encode("utf-8")
        self.types = _check_types(types)
        self.sam: SuffixAutomaton | None = None  # with the facts below, made by _index_text
        self._nothing = NOTHING.encode("utf-8")
        _, self._type_kids, self._type_end, self._type_need = _type_trie(tuple(self.types))
        if build:
            self._build()

    def _index_text(self) -> None:
        """The text's suffix automaton and facts about the character ending at each byte.

        Deferred until an entity is first stepped into: a lazy answer (GroundedAnswer) then pays
        for it inside the decode loop, while the GPU runs, rather than all before it."""
        if self.sam is not None:
            return
        data, n = self.data, len(self.data)
        self._char_end = [False] * n
        self._space_end = [False] * n
        self._bad_end = [False] * n
        pos = 0
        for ch in self.text:
            pos += len(ch.encode("utf-8"))
            self._char_end[pos - 1] = True
            self._space_end[pos - 1] = ch.isspace()
            self._bad_end[pos - 1] = ch == SEPARATOR or _breaks_line(ch)
        self.sam = SuffixAutomaton(data)

    # -- key-level grammar -------------------------------------------------------------------

    def _can_end(self, v: int, pending: int) -> bool:
        if v <= 0 or pending:
            return False
        pos = self.sam.endpos[v]
        return self._char_end[pos] and not self._space_end[pos]

    def _candidates(self, key: tuple) -> Iterable[int]:
        if key[0] == _AFTER_NL:
            key = (_LINE, 0, 1, -1)
        if key[0] == _TYPE:
            node = key[1]
            kids = self._type_kids[node]
            return (*kids, _NL) if self._type_end[node] else kids
        _, v, pending, k = key
        out = set(self.sam.next[v]) if v >= 0 else set()
        if v >= 0 and self._can_end(v, pending):
            out.add(_US)
        if 0 <= k < len(self._nothing):
            out.add(self._nothing[k])
        return out

    def _step_key(self, key: tuple, byte: int) -> tuple | None:
        if key[0] == _AFTER_NL:
            key = (_LINE, 0, 1, -1)
        if key[0] == _TYPE:
            node = key[1]
            if byte == _NL:
                return (_AFTER_NL,) if self._type_end[node] else None
            child = self._type_kids[node].get(byte)
            return None if child is None else (_TYPE, child)
        _, v, pending, k = key
        if byte == _US:
            return (_TYPE, 0) if v >= 0 and self._can_end(v, pending) else None
        nv, npending = -1, 0
        if v >= 0 and byte != _NL and not (v == 0 and _utf8_length(byte) == 0):
            w = self.sam.next[v].get(byte)
            if w is not None:
                pos = self.sam.endpos[w]
                if self._char_end[pos]:
                    # A character was completed: check it, and the first one is not a space.
                    if not self._bad_end[pos] and not (pending and self._space_end[pos]):
                        nv, npending = w, 0
                else:
                    nv, npending = w, pending
        nk = k + 1 if 0 <= k < len(self._nothing) and self._nothing[k] == byte else -1
        if nv < 0 and nk < 0:
            return None
        return (_LINE, nv, npending, nk)

    def _accepting_key(self, key: tuple) -> bool:
        if key[0] == _AFTER_NL:
            return True
        if key[0] == _TYPE:
            return self._type_end[key[1]]
        return key[3] == len(self._nothing)

    # -- determinised automaton ----------------------------------------------------------------

    def _build(self) -> None:
        self._index_text()
        start = self.START_KEY
        ids = {start: 0}
        keys = [start]
        trans: list[dict[int, int]] = []
        i = 0
        while i < len(keys):
            key = keys[i]
            row: dict[int, int] = {}
            for byte in self._candidates(key):
                nxt = self._step_key(key, byte)
                if nxt is None:
                    continue
                sid = ids.get(nxt)
                if sid is None:
                    sid = ids[nxt] = len(keys)
                    keys.append(nxt)
                row[byte] = sid
            trans.append(row)
            i += 1
        accepting = [self._accepting_key(key) for key in keys]
        # Keep only states from which an accepting state is reachable.
        rev: list[list[int]] = [[] for _ in keys]
        for s, row in enumerate(trans):
            for t in row.values():
                rev[t].append(s)
        live = list(accepting)
        queue = deque(s for s, ok in enumerate(accepting) if ok)
        while queue:
            t = queue.popleft()
            for s in rev[t]:
                if not live[s]:
                    live[s] = True
                    queue.append(s)
        self.trans = [{b: t for b, t in row.items() if live[t]} for row in trans]
        self.accepting = accepting
        self.keys = keys
        self.ids = ids
        self.start = 0

    def feed_key(self, key: tuple, data: bytes) -> tuple | None:
        """The key after `data` from `key` without the built automaton; None where a byte is refused.

        Follows the same transitions `_build` enumerates, but keeps states from which no answer
        can be completed (the built automaton drops them): `path_bytes` tells those apart.
        """
        self._index_text()
        for byte in data:
            key = self._step_key(key, byte)
            if key is None:
                return None
        return key

    def path_bytes(self, key: tuple) -> int | None:
        """The length in bytes of some path from `key` to a complete answer; None if none is found
        cheaply (not a proof that there is none).

        Tried: finishing 没有, finishing the type, or following the text on from the entity for a
        few bytes until it may end, then "_" and the shortest type.
        """
        if key[0] == _AFTER_NL:
            return 0
        if key[0] == _TYPE:
            need = self._type_need[key[1]]
            return None if need >= _INF else need
        _, v, pending, k = key
        best = len(self._nothing) - k if 0 <= k <= len(self._nothing) else None
        pos = self._end_of(v)
        if pos >= 0:
            shortest_type = self._type_need[0]
            walked = 0
            # The entity so far occurs ending at `pos`, so the text's next bytes extend it.
            while walked <= 12:
                if self._can_end(key[1], key[2]):
                    length = walked + 1 + shortest_type
                    best = length if best is None else min(best, length)
                    break
                pos += 1
                if pos >= len(self.data):
                    break
                key = self._step_key(key, self.data[pos])
                if key is None or key[0] != _LINE or self._dead(key[1]):
                    break
                walked += 1
        return best

    def _end_of(self, v) -> int:
        """Where one occurrence of the entity so far ends in the text; -1 when it is empty or dead."""
        if v <= 0:
            return -1
        self._index_text()
        return self.sam.endpos[v]

    @staticmethod
    def _dead(v) -> bool:
        return v < 0

    def step(self, state: int, byte: int) -> int:
        if state < 0:
            return -1
        return self.trans[state].get(byte, -1)

    def feed(self, state: int, data: bytes) -> int:
        trans = self.trans
        for byte in data:
            if state < 0:
                return -1
            state = trans[state].get(byte, -1)
        return state

    def accepts(self, answer: str) -> bool:
        """Whether `answer` is a complete answer (EOS may follow)."""
        state = self.feed(self.start, answer.encode("utf-8"))
        return state >= 0 and self.accepting[state]

    def is_prefix(self, answer: str) -> bool:
        """Whether `answer` can still be completed into a complete answer."""
        return self.feed(self.start, answer.encode("utf-8")) >= 0

    def token_distances(self, units: frozenset[bytes]) -> list[int]:
        """Per state, the fewest unit tokens (single bytes or characters in `units`) to acceptance.

        An upper bound of the tokens really needed from there; unreachable states get a huge
        value. The path it measures always exists, which is what makes the budget safe.
        """
        trans = self.trans
        rev: list[list[int]] = [[] for _ in trans]
        for s, row in enumerate(trans):
            for byte, t in row.items():
                if bytes((byte,)) in units:
                    rev[t].append(s)
                need = _utf8_length(byte) - 1
                if need <= 0:
                    continue
                frontier = [(t, bytes((byte,)))]
                for _ in range(need):
                    frontier = [
                        (t2, prefix + bytes((c,)))
                        for t1, prefix in frontier
                        for c, t2 in trans[t1].items()
                        if 0x80 <= c < 0xC0
                    ]
                for t_end, char in frontier:
                    if char in units:
                        rev[t_end].append(s)
        dist = [_INF] * len(trans)
        queue = deque()
        for s, ok in enumerate(self.accepting):
            if ok:
                dist[s] = 0
                queue.append(s)
        while queue:
            t = queue.popleft()
            for s in rev[t]:
                if dist[s] == _INF:
                    dist[s] = dist[t] + 1
                    queue.append(s)
        return dist


class _SpanGrammar(NerGrammar):
    """NerGrammar's key-level steps without the suffix automaton, for lazy answers.

    The entity so far is the span (start, end) of its first occurrence in the text ((0, 0) while
    empty, None once dead), extended by the text's next byte when that is the byte read, else by
    searching the text for the longer string (bytes.find, in C). A greedy answer walks one path,
    so this costs a few comparisons per byte instead of building the text's automaton (~0.1 ms
    per MSRA sentence in Python). Characters are checked where an occurrence ends; any
    occurrence will do, as UTF-8 is self-synchronising and the entity starts on a character.
    `built_key` turns a key into the automaton's, for when the answer has to be built after all.
    """

    START_KEY = (_LINE, (0, 0), 1, 0)
    _EMPTY = (0, 0)

    def __init__(self, text: str, types: Iterable[str]):
        super().__init__(text, types, build=False)
        self._facts: dict[int, tuple[bool, bool, bool]] = {}

    def _index_text(self) -> None:
        pass  # nothing to index: occurrences are searched and characters read where needed

    def _build(self) -> None:
        raise TypeError("a _SpanGrammar only steps keys; NerGrammar builds the automaton")

    def _char(self, pos: int) -> tuple[bool, bool, bool]:
        """(a character ends at pos, it is whitespace, it may not be inside an entity)."""
        facts = self._facts.get(pos)
        if facts is None:
            data = self.data
            if pos + 1 < len(data) and 0x80 <= data[pos + 1] < 0xC0:
                facts = (False, False, False)
            else:
                start = pos
                while start > 0 and 0x80 <= data[start] < 0xC0:
                    start -= 1
                ch = data[start:pos + 1].decode("utf-8")
                facts = (True, ch.isspace(), ch == SEPARATOR or _breaks_line(ch))
            self._facts[pos] = facts
        return facts

    def _can_end(self, v, pending: int) -> bool:
        if v is None or v[1] == v[0] or pending:
            return False
        ends, space, _ = self._char(v[1] - 1)
        return ends and not space

    def _end_of(self, v) -> int:
        return -1 if v is None or v[1] == v[0] else v[1] - 1

    @staticmethod
    def _dead(v) -> bool:
        return v is None

    def _step_key(self, key: tuple, byte: int) -> tuple | None:
        if key[0] == _AFTER_NL:
            key = (_LINE, self._EMPTY, 1, -1)
        if key[0] == _TYPE:
            return NerGrammar._step_key(self, key, byte)
        _, v, pending, k = key
        if byte == _US:
            return (_TYPE, 0) if self._can_end(v, pending) else None
        nv, npending = None, 0
        if v is not None and byte != _NL:
            start, end = v
            data = self.data
            w = None
            if end > start:
                if end < len(data) and data[end] == byte:
                    w = (start, end + 1)
                else:
                    at = data.find(data[start:end] + bytes((byte,)), start + 1)
                    w = (at, at + end - start + 1) if at >= 0 else None
            elif _utf8_length(byte):  # an entity starts on a character
                at = data.find(bytes((byte,)))
                w = (at, at + 1) if at >= 0 else None
            if w is not None:
                ends, space, bad = self._char(w[1] - 1)
                if ends:
                    # A character was completed: check it, and the first one is not a space.
                    if not bad and not (pending and space):
                        nv, npending = w, 0
                else:
                    nv, npending = w, pending
        nk = k + 1 if 0 <= k < len(self._nothing) and self._nothing[k] == byte else -1
        if nv is None and nk < 0:
            return None
        return (_LINE, nv, npending, nk)

    def built_key(self, key: tuple, built: NerGrammar) -> tuple:
        """The same key in `built`'s terms (its suffix automaton's state for the entity so far)."""
        if key[0] != _LINE:
            return key
        _, v, pending, k = key
        if v is None:
            state = -1
        else:
            state = 0
            for byte in self.data[v[0]:v[1]]:
                state = built.sam.next[state][byte]
        return (_LINE, state, pending, k)


# ----------------------------------------------------------------------------------------------
# The logits processor
# ----------------------------------------------------------------------------------------------


class _GroundedText:
    """Grammar, budget distances and allowed-token cache shared by the rows of one text."""

    def __init__(self, text: str, types: list[str], trie: TokenTrie, forbidden: frozenset[int]):
        self.grammar = NerGrammar(text, types)
        self.dist = self.grammar.token_distances(trie.units)
        self.trie = trie
        self.forbidden = forbidden
        self.cache: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.vocab = -1

    def allowed(self, state: int, vocab: int) -> tuple[torch.Tensor, list[int]]:
        """Token ids allowed from `state`, with the distance they lead to, sorted by distance."""
        if vocab != self.vocab:
            self.cache.clear()
            self.vocab = vocab
        hit = self.cache.get(state)
        if hit is not None:
            return hit
        trans, dist = self.grammar.trans, self.dist
        kids, ends, forbidden = self.trie.kids, self.trie.ends, self.forbidden
        found: list[tuple[int, int]] = []
        stack = [(0, state)]
        while stack:
            node, st = stack.pop()
            base = node << 8
            for byte, nst in trans[st].items():
                child = kids.get(base | byte)
                if child is None:
                    continue
                tids = ends.get(child)
                if tids is not None and dist[nst] < _INF:
                    d = dist[nst]
                    found.extend((d, t) for t in tids if t < vocab and t not in forbidden)
                stack.append((child, nst))
        found.sort()
        hit = (torch.tensor([t for _, t in found], dtype=torch.long), [d for d, _ in found])
        self.cache[state] = hit
        return hit


_DONE = -2


class GroundedNerLogitsProcessor(LogitsProcessor):
    """Masks every token that would make an NER answer ill-formed or ungrounded.

    Args:
        tokenizer: the model's tokenizer (SentencePiece with byte fallback, or byte-level BPE).
        texts: one text per batch row, the raw sentence the prompt is about (entities must be its
            substrings); see ``ner_text_from_query``. For ``num_return_sequences=n`` repeat each
            text n times in a row, as generate() does with the prompts.
        types: allowed entity types.
        prompt_length: ``input_ids.shape[1]`` of the (left-padded) batch given to generate();
            generated tokens are read from that column on.
        max_new_tokens: the same value (or smaller) as passed to generate(); must be at least
            ``min_new_tokens_required`` (checked: ValueError).
        eos_token_id: id or ids that end an answer; default ``tokenizer.eos_token_id``.

    Greedy and sampling only: beam search reorders rows between steps, which the incremental
    per-row state cannot follow, so a batch with more rows than texts (num_beams > 1) or rows whose
    history changed raises ValueError/RuntimeError. Do not combine with processors that forbid
    EOS (``min_new_tokens``), which can leave a row with no token at all.
    """

    supports_continuous_batching = False

    def __init__(
        self,
        tokenizer,
        texts: Sequence[str],
        types: Sequence[str],
        prompt_length: int,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ):
        if isinstance(texts, str):
            raise TypeError("texts must be a list with one text per batch row, not a single string")
        if not texts:
            raise ValueError("texts is empty: give one text per batch row")
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
        if eos_token_id is None:
            raise ValueError("no eos_token_id given and the tokenizer has none")
        eos = (
            [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        )
        if not eos:
            raise ValueError("eos_token_id is empty")
        self.trie = token_trie(tokenizer)
        for e in eos:
            if 0 <= e < len(self.trie.table) and self.trie.table[e] is not None:
                raise ValueError(
                    f"eos token {e} decodes to text {self.trie.table[e]!r}; "
                    "it must be a special token"
                )
        self.eos_ids = sorted(set(eos))
        self._eos_set = frozenset(self.eos_ids)
        self.types = _check_types(types)
        self.prompt_length = int(prompt_length)
        self.max_new_tokens = int(max_new_tokens)
        by_text: dict[str, _GroundedText] = {}
        for text in texts:
            if text not in by_text:
                by_text[text] = _GroundedText(text, self.types, self.trie, self._eos_set)
        self._rows = [by_text[text] for text in texts]
        needed = max(g.dist[g.grammar.start] for g in by_text.values())
        if needed >= _INF:
            missing = "".join(f"\\x{b:02x}" for b in sorted(self.trie.missing_bytes)[:16])
            raise ValueError(
                "this tokenizer lacks single-byte tokens (e.g. " + missing + ") needed to spell a "
                "guaranteed answer; grounded decoding needs byte fallback or byte-level BPE"
            )
        # One token per unit of the shortest answer, plus EOS.
        self.min_new_tokens_required = needed + 1
        if self.max_new_tokens < self.min_new_tokens_required:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is too small for a guaranteed "
                f"well-formed answer: this batch needs at least {self.min_new_tokens_required}"
            )
        # Generated tokens seen at the last call; None until the first call.
        self._history: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._states = [g.grammar.start for g in self._rows]
        self._seen = 0

    def finished(self) -> list[bool]:
        """Per row, whether it has emitted EOS."""
        return [s == _DONE for s in self._states]

    def _advance(self, row: int, tokens: list[int]) -> None:
        state = self._states[row]
        for tid in tokens:
            if state == _DONE:
                break  # generate() pads finished rows; nothing to check
            state = _next_state(self._rows[row], self.trie, self._eos_set, state, tid, f"row {row}")
        self._states[row] = state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if rows != len(self._rows):
            raise ValueError(
                f"GroundedNerLogitsProcessor was built for {len(self._rows)} rows but got "
                f"{rows}: beam search (num_beams > 1) is not supported; for "
                "num_return_sequences > 1 repeat each text accordingly"
            )
        generated = length - self.prompt_length
        if generated < 0:
            raise ValueError(
                f"input length {length} is shorter than prompt_length={self.prompt_length}"
            )
        if generated == 0:
            self._reset()  # a new generate() call
        elif self._history is None:
            raise ValueError(
                f"the first call already has {generated} tokens after "
                f"prompt_length={self.prompt_length}: "
                "prompt_length must be input_ids.shape[1] of the padded batch given to generate()"
            )
        elif generated < self._seen or not torch.equal(
            input_ids[:, self.prompt_length : self.prompt_length + self._seen], self._history
        ):
            raise RuntimeError(
                "earlier generated tokens changed between calls: beam search is not supported, "
                "and a processor serves one batch (one prompt_length) only"
            )
        if generated > self._seen:
            new = input_ids[:, self.prompt_length + self._seen :].tolist()
            for row, tokens in enumerate(new):
                self._advance(row, tokens)
        self._seen = generated
        self._history = input_ids[:, self.prompt_length :].clone()

        vocab = scores.shape[-1]
        left = self.max_new_tokens - generated  # tokens still to come, this one included
        eos = torch.tensor([e for e in self.eos_ids if e < vocab], dtype=torch.long)
        if not len(eos):
            raise ValueError(
                f"no eos id in {self.eos_ids} is below the model's vocabulary size {vocab}"
            )
        # The mask is kept sparse, as (row, column) pairs of allowed tokens, built on the CPU and
        # moved to the device in one transfer: on CPU a dense (rows, vocab) boolean mask with
        # masked_fill took ~5 ms per step for a 152k vocabulary, scattering the allowed scores into
        # a -inf tensor costs little more than allocating that tensor, and only KBs are copied.
        columns: list[torch.Tensor] = []
        counts: list[int] = []
        for row, state in enumerate(self._states):
            allowed = _allowed_tokens(self._rows[row], state, left, vocab, eos)
            columns.append(allowed)
            counts.append(len(allowed))
        cols = torch.cat(columns)
        index = torch.stack(
            (torch.repeat_interleave(torch.arange(rows), torch.tensor(counts)), cols)
        )
        index = index.to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[index[0], index[1]] = scores[index[0], index[1]]
        return out


def _next_state(grounded: _GroundedText, trie: TokenTrie, eos: frozenset[int], state: int, tid: int,
                where: str) -> int:
    """The grammar state after token `tid`; _DONE after EOS. A token the mask forbade is a bug: raised."""
    if tid in eos:
        if not grounded.grammar.accepting[state]:
            raise RuntimeError(f"{where}: EOS outside a complete answer; was the mask overridden?")
        return _DONE
    data = trie.table[tid] if 0 <= tid < len(trie.table) else None
    nxt = grounded.grammar.feed(state, data) if data else -1
    if nxt < 0:
        raise RuntimeError(
            f"{where}: token {tid} ({data!r}) breaks the answer grammar; "
            "was the mask overridden by a later logits processor, or is this beam search?"
        )
    return nxt


def _allowed_tokens(grounded: _GroundedText, state: int, left: int, vocab: int, eos: torch.Tensor) -> torch.Tensor:
    """Token ids allowed from `state` with `left` tokens to come (this one included)."""
    if state == _DONE or left <= 0:
        return eos
    ids, dists = grounded.allowed(state, vocab)
    # After this token: dist units to an accepting state, then EOS, within left - 1 tokens.
    cut = bisect.bisect_right(dists, left - 2)
    if grounded.grammar.accepting[state]:
        return torch.cat((ids[:cut], eos))
    return ids[:cut]


class GroundedAnswer:
    """The grounded-decoding state of one answer, for the engine, which decodes rows independently.

    The same grammar, budget and masks as GroundedNerLogitsProcessor, per request instead of per
    batch: `allowed(generated, vocab)` gives the token ids the next token may take, `permits`
    checks one token, and `advance(token)` moves past the chosen one.

    Building a text's whole automaton and budget table costs milliseconds of Python (a 4,631-line
    MSRA file: longer than decoding it on a GPU), while a greedy row only walks one path through
    it. So with a tokenizer that has every single byte as a token, the answer starts lazy: a
    token is permitted when it steps through the grammar to a state from which some answer fits
    in the budget (`NerGrammar.path_bytes`: a path of single bytes, each a unit token, bounds the
    budget table's distance). Only when that cheap check cannot decide, or the full list of
    allowed tokens is asked for, is the automaton built; the answers are the same either way.
    """

    def __init__(self, tokenizer, text: str, types: Sequence[str], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, shared: dict | None = None):
        # `shared` holds one processor-like context per (tokenizer, types): building the grammar of
        # a text is per request, the token trie and checks are not.
        key = (id(tokenizer), tuple(types), max_new_tokens,
               tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id)
        context = shared.get(key) if shared is not None else None
        if context is None:
            context = GroundedNerLogitsProcessor(tokenizer, texts=[text], types=types, prompt_length=0,
                                                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
            if shared is not None:
                shared[key] = context
        self.trie, self.eos_set = context.trie, context._eos_set
        self.eos = torch.tensor(context.eos_ids, dtype=torch.long)
        self.max_new_tokens = max_new_tokens
        self._source, self._types = text, context.types
        self._full: _GroundedText | None = None
        self._state = 0  # the built automaton's state, once built
        self._grammar = _SpanGrammar(text, context.types)
        self._key: tuple | None = _SpanGrammar.START_KEY  # None: the answer has ended (EOS)
        self._checked: tuple[int, tuple] | None = None  # (token, key after it) of the last permits
        need = self._grammar.path_bytes(self._key)
        if self.trie.missing_bytes or need is None or need + 1 > max_new_tokens:
            self._build()
            if self._full.dist[self._full.grammar.start] + 1 > max_new_tokens:
                raise ValueError(f"max_new_tokens={max_new_tokens} is too small for a guaranteed well-formed "
                                 f"answer: this text needs at least {self._full.dist[self._full.grammar.start] + 1}")

    def _build(self) -> _GroundedText:
        if self._full is None:
            self._full = _GroundedText(self._source, self._types, self.trie, self.eos_set)
            # the key reached so far is live (only permitted tokens led to it), so it has an id
            built = self._full.grammar
            self._state = _DONE if self._key is None else built.ids[self._grammar.built_key(self._key, built)]
        return self._full

    @property
    def text(self) -> _GroundedText:
        """The text's built automaton and budget table (built now if it was not yet)."""
        return self._build()

    @property
    def state(self) -> int:
        """The built automaton's current state (_DONE after EOS)."""
        if self._full is None and self._key is None:
            return _DONE
        self._build()
        return self._state

    def allowed(self, generated: int, vocab: int) -> torch.Tensor:
        eos = self.eos[self.eos < vocab]
        return _allowed_tokens(self._build(), self._state, self.max_new_tokens - generated, vocab, eos)

    def permits(self, token: int, generated: int, vocab: int) -> bool:
        """Whether `token` is one of allowed(generated, vocab), without listing them.

        The engine decodes grounded rows greedily without masks and checks each chosen token:
        if the model's own choice is allowed it is also the best allowed one, and with a trained
        model it nearly always is, so the allowed set is listed only for the rare rejected step.
        """
        token = int(token)
        if not 0 <= token < vocab:
            return False
        left = self.max_new_tokens - generated
        done = self._key is None if self._full is None else self._state == _DONE
        if done or left <= 0:
            return token in self.eos_set
        if self._full is None:
            if token in self.eos_set:
                return self._grammar._accepting_key(self._key)
            data = self.trie.table[token] if token < len(self.trie.table) else None
            if not data or token in self.eos_set:
                return False
            nxt = self._grammar.feed_key(self._key, data)
            if nxt is None:
                return False
            need = self._grammar.path_bytes(nxt)
            if need is not None and need <= left - 2:
                self._checked = (token, nxt)
                return True
            self._build()  # undecided cheaply: the built automaton decides, from now on
        full = self._full
        if token in self.eos_set:
            return bool(full.grammar.accepting[self._state])
        data = self.trie.table[token] if token < len(self.trie.table) else None
        if not data or token in full.forbidden:
            return False
        nxt = full.grammar.feed(self._state, data)
        return nxt >= 0 and full.dist[nxt] <= left - 2

    def advance(self, token: int) -> None:
        token = int(token)
        if self._full is None:
            if self._key is None:
                return
            if token in self.eos_set and self._grammar._accepting_key(self._key):
                self._key = None
                return
            checked, self._checked = self._checked, None
            if checked is not None and checked[0] == token:
                self._key = checked[1]
                return
            data = self.trie.table[token] if 0 <= token < len(self.trie.table) else None
            nxt = self._grammar.feed_key(self._key, data) if data else None
            if nxt is not None and self._grammar.path_bytes(nxt) is not None:
                self._key = nxt
                return
            self._build()  # a token not checked first: the built automaton says whether it may follow
        if self._state != _DONE:
            self._state = _next_state(self._full, self.trie, self.eos_set, self._state, token, "grounded answer")


def grounded_processor_factory(
    tokenizer, queries: Sequence[str], types: Sequence[str]
) -> Callable[[torch.Tensor, int], GroundedNerLogitsProcessor]:
    """A ``logits_processor_factory`` for ``generation.generate_batch`` on MSRA-style queries.

    `queries` are the instruction inputs ("文本：" + sentence; plain sentences pass through), one
    per prompt of the batch. The processor is built by the factory because it needs the width of
    the left-padded batch (its prompt_length) and max_new_tokens, known only inside generate_batch.
    """
    texts = [ner_text_from_query(q) for q in queries]

    def make(input_ids: torch.Tensor, max_new_tokens: int) -> GroundedNerLogitsProcessor:
        return GroundedNerLogitsProcessor(
            tokenizer,
            texts=texts,
            types=types,
            prompt_length=int(input_ids.shape[-1]),
            max_new_tokens=max_new_tokens,
        )

    return make
