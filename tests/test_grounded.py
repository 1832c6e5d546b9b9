"""Grounded decoding: byte tables, the answer automaton and the logits processor end to end."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    SentencePieceBackend,
)

from cnqlora.grounded import (
    GroundedNerLogitsProcessor,
    NerGrammar,
    SuffixAutomaton,
    allowed_types_from_answers,
    byte_table_kind,
    byte_table_mismatches,
    grounded_processor_factory,
    ner_text_from_query,
    token_byte_table,
    token_trie,
)
from cnqlora.tiny import train_sentencepiece

TYPES = ["人名", "地名", "机构名"]

CORPUS = [
    "北京大学的张三去了上海。",
    "李四在中国科学院工作。",
    "王五和赵六访问了广州市政府。",
    "我们没有看到他。",
    "今天天气很好，没有下雨。",
    "清华大学位于北京市海淀区。",
    "新华社记者从南京报道。",
    "国务院总理会见了美国客人。",
    "联合国大会在纽约召开。",
    "小明的爸爸在医院上班。",
    "上海交通大学有很多学生。",
    "中国人民银行发布了新规定。",
    "他从天津来到了深圳。",
    "马云创办了阿里巴巴公司。",
    "长江是中国最长的河流。",
    "黄河流经九个省份。",
    "杭州西湖非常美丽。",
    "武汉大学的樱花开了。",
    "刘备、关羽和张飞在桃园结义。",
    "诸葛亮住在隆中。",
    "广东省人民医院位于广州。",
    "这个问题没有答案。",
    "世界卫生组织总部在日内瓦。",
    "欧洲联盟有很多成员国。",
    "周杰伦在台北开演唱会。",
    "香港特别行政区政府发布公告。",
    "四川的火锅很有名。",
    "哈尔滨的冬天很冷。",
    "西藏自治区首府是拉萨。",
    "孙悟空和猪八戒去西天取经。",
    "北京时间八点，新闻联播开始。",
    "教育部公布了高考时间。",
    "他在复旦大学读书。",
    "重庆和成都都在西南。",
    "山东大学在济南。",
    "中央电视台播出了晚会。",
    "李白是唐朝的诗人。",
    "杜甫的诗很有名。",
    "苏州园林天下闻名。",
    "厦门大学靠近海边。",
    "郑州是河南的省会。",
    "南昌起义发生在江西。",
    "毛泽东出生在湖南韶山。",
    "人工智能研究院成立了。",
    "微软公司在西雅图。",
    "Apple 公司发布了新手机。",
    "他说 hello world 然后走了。",
    "2024 年的奥运会在巴黎举行。",
    "A_B 是一个代号。",
    "没有人知道答案。",
]

# Texts to ground. Rare characters (one of them outside the BMP) are not in CORPUS, so the
# SentencePiece tokenizers spell them with byte-fallback pieces.
TEXTS = [
    "北京大学的张三去了上海。",
    "李四在中国科学院工作，没有回家。",
    "鱻龘𠀋是罕见字，王五_赵六在 New York 见面。",
    "这个问题没有答案。",
    "",
    "  A  b\tc  d ",
    "北京大学的张三去了上海。",
]


def _train_byte_level(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|pad|>"],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


class _SentencePieceTokenizer(SentencePieceBackend):
    """Minimal slow SentencePiece tokenizer whose decode is sp_model.decode (as Baichuan's)."""

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode(tokens)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    # hand-offs of every small op dominate the run time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("grounded_sp") / "tokenizer.model")
    return train_sentencepiece(CORPUS, path, vocab_size=700)


def _load(kind, sp_model_path):
    if kind == "sp":
        tok = _SentencePieceTokenizer(
            vocab_file=sp_model_path,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
        )
    elif kind == "llama_fast":
        folder = os.path.join(os.path.dirname(sp_model_path), "llama")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(sp_model_path, os.path.join(folder, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(folder)
        tok.pad_token = tok.eos_token
    elif kind == "baichuan":
        baichuan = pytest.importorskip("cnqlora.baichuan")
        tok = baichuan.BaichuanTokenizer(vocab_file=sp_model_path)
    else:
        tok = _train_byte_level(CORPUS, 600)
    tok.padding_side = "left"
    return tok


_TOKENIZERS: dict = {}


@pytest.fixture(params=["sp", "byte_level", "llama_fast", "baichuan"])
def tokenizer(request, sp_model_path):
    if request.param not in _TOKENIZERS:
        _TOKENIZERS[request.param] = _load(request.param, sp_model_path)
    return _TOKENIZERS[request.param]


def _get_tokenizer(kind, sp_model_path):
    if kind not in _TOKENIZERS:
        _TOKENIZERS[kind] = _load(kind, sp_model_path)
    return _TOKENIZERS[kind]


# ---------------------------------------------------------------------------------------------
# Helpers around the data format
# ---------------------------------------------------------------------------------------------


def test_query_and_types_helpers():
    assert ner_text_from_query("文本：北京欢迎你") == "北京欢迎你"
    assert ner_text_from_query("文本:北京") == "北京"
    assert ner_text_from_query("北京文本：") == "北京文本："
    answers = ["北京_地名\n张三_人名", "没有", "A_B_机构名\n\n上海_地名", "garbage", "_人名"]
    assert allowed_types_from_answers(answers) == ["地名", "人名", "机构名"]


# ---------------------------------------------------------------------------------------------
# Byte tables
# ---------------------------------------------------------------------------------------------

_EXPECTED_KIND = {
    "sp": "sentencepiece",
    "baichuan": "sentencepiece",
    "llama_fast": "sp_tokenizers",
    "byte_level": "byte_level",
}


def test_byte_table_matches_decode(tokenizer):
    kind = byte_table_kind(tokenizer)
    assert kind == _EXPECTED_KIND[next(k for k, v in _TOKENIZERS.items() if v is tokenizer)]
    table = token_byte_table(tokenizer)
    assert len(table) >= len(tokenizer)
    for tid in {
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        tokenizer.unk_token_id,
        tokenizer.pad_token_id,
    } - {None}:
        assert table[tid] is None
    # Every byte has a single-byte token: the budget relies on it.
    singles = {data for data in table if data is not None and len(data) == 1}
    assert len(singles) == 256

    rng = random.Random(0)
    chars = sorted(set("".join(CORPUS + TEXTS)) | set("鱻龘𠀋靐齉é\n_ "))
    samples = list(CORPUS) + [t for t in TEXTS if t and not t.startswith(" ")]
    for _ in range(60):
        s = "".join(rng.choice(chars) for _ in range(rng.randint(1, 25)))
        if not s.startswith(" "):
            samples.append(s)
    lists = [tokenizer.encode(s, add_special_tokens=False) for s in samples]
    for s, ids in zip(samples, lists):
        assert all(table[i] is not None for i in ids), s
        assert b"".join(table[i] for i in ids).decode("utf-8") in (s, " " + s)
    # Random id sequences too (as a sampling model would produce), where they form valid UTF-8.
    usable = [i for i, data in enumerate(table) if data is not None]
    random_lists = []
    while len(random_lists) < 200:
        ids = [rng.choice(usable) for _ in range(rng.randint(1, 8))]
        data = b"".join(table[i] for i in ids)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not data.startswith(b" "):
            random_lists.append(ids)
    assert byte_table_mismatches(tokenizer, table, lists + random_lists) == []


def test_byte_fallback_pieces_are_bytes(sp_model_path):
    tok = _get_tokenizer("sp", sp_model_path)
    table = token_byte_table(tok)
    ids = tok.encode("𠀋", add_special_tokens=False)
    assert len(ids) == 4 and [table[i] for i in ids] == [bytes((b,)) for b in "𠀋".encode()]


def test_token_trie_is_cached_and_checked(sp_model_path):
    tok = _get_tokenizer("byte_level", sp_model_path)
    assert token_trie(tok) is token_trie(tok)

    class Undecoded(SentencePieceBackend):
        """The base class decodes "<0x41>" pieces as literal text: the check must refuse it."""

    bad = Undecoded(vocab_file=sp_model_path, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="cannot map"):
        token_trie(bad)


# ---------------------------------------------------------------------------------------------
# Automata
# ---------------------------------------------------------------------------------------------


def test_suffix_automaton_recognises_exactly_the_substrings():
    rng = random.Random(1)
    for text in ["abcbc", "北京大学北京", "aaaaab", "鱻A鱻𠀋x"]:
        data = text.encode()
        sam = SuffixAutomaton(data)
        assert len(sam.next) <= max(2 * len(data), 2)
        subs = {data[i:j] for i in range(len(data)) for j in range(i, len(data) + 1)}
        for sub in subs:
            assert sam.contains(sub)
        alphabet = sorted(set(data)) + [0x00]
        for _ in range(500):
            cand = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            assert sam.contains(cand) == (cand in subs)


def test_grammar_accepts_grounded_answers():
    g = NerGrammar("北京大学的张三去了上海。没有 a_b", TYPES)
    for good in [
        "北京_地名",
        "北京_地名\n",
        "北京_地名\n张三_人名",
        "京大_机构名\n上海_地名\n",
        "没有",
        "没有_人名",
        "没有 a_人名",
        "b_人名",
        "。_地名",
        "北京大学的张三去了上海。没有 a_人名",
    ]:
        assert g.accepts(good), good
    for bad in [
        "北京上海_地名",
        "东京_地名",
        "_人名",
        "北京\n",
        "北京_",
        "北京_地",
        "北京_城市",
        "没有\n",
        "没",
        "没有_",
        "北京_地名\n\n",
        "\n北京_地名",
        "",
        "北京_地名_人名",
        " a_人名",
        "没有 _人名",
        "a_b_人名",
        "北京_地名\n没有",
        "北京_地名没有",
    ]:
        assert not g.accepts(bad), bad
    # Prefixes that can still be completed, and some that cannot.
    assert g.is_prefix("北京_地") and g.is_prefix("北京_地名\n张") and g.is_prefix("没")
    assert not g.is_prefix("北京_地名\n\n") and not g.is_prefix("上海。没有 a ")


def test_grammar_character_boundaries_and_spaces():
    g = NerGrammar("北京 x\u2028y", TYPES)
    bei = "北".encode()
    state = g.feed(g.start, bei[:2])
    assert state >= 0 and not g.accepting[state]
    assert g.step(state, ord("_")) == -1  # entity ends inside a character
    assert g.feed(g.start, bei[1:]) == -1  # entity starts inside a character
    assert g.step(g.feed(g.start, bei), ord("_")) >= 0
    assert g.accepts("北京 x_人名") and not g.accepts("北京 _人名") and not g.accepts(" x_人名")
    assert not g.accepts("x\u2028y_人名") and g.accepts("y_人名")  # no line breaks inside


def test_grammar_types_newline_and_eos_rules():
    g = NerGrammar("张三", ["人", "人名", "名人堂"])
    s = g.feed(g.start, "张三_人".encode())
    assert g.accepting[s]  # "人" is complete...
    s2 = g.feed(s, "名".encode())
    assert g.accepting[s2]  # ...and so is the longer "人名"
    assert not g.accepting[g.feed(g.start, "张三_名人".encode())]
    nl = g.feed(s2, b"\n")
    assert g.accepting[nl]  # after a newline EOS may follow
    assert g.step(nl, ord("\n")) == -1
    assert not g.accepting[g.start] and not g.accepting[g.feed(g.start, "张三".encode())]
    assert g.accepting[g.feed(g.start, "没有".encode())]
    with pytest.raises(ValueError):
        NerGrammar("x", ["a_b"])
    with pytest.raises(ValueError):
        NerGrammar("x", [])


def test_budget_distances():
    g = NerGrammar("张三abc", TYPES)
    singles = frozenset(bytes((b,)) for b in range(256))
    dist = g.token_distances(singles)
    # In bytes "没有" (6) beats "a_人名" (8); in characters both are short but 没有 is 2 units.
    assert dist[g.start] == 6
    assert dist[g.feed(g.start, b"a")] == 1 + 6
    with_chars = singles | {ch.encode() for ch in "没有人名"}
    assert g.token_distances(with_chars)[g.start] == 2
    assert g.token_distances(with_chars)[g.feed(g.start, b"ab")] == 1 + 2
    # Without single bytes for Chinese, whole characters still give a guaranteed path...
    chars_only = frozenset({b"a", b"_"} | {ch.encode() for ch in "人名"})
    assert g.token_distances(chars_only)[g.start] == 4
    # ...but a state inside a character that no unit can finish is out of budget.
    assert g.token_distances(chars_only)[g.feed(g.start, "张".encode()[:1])] >= 1 << 30
    assert g.token_distances(frozenset())[g.start] >= 1 << 30


# ---------------------------------------------------------------------------------------------
# The processor with a tiny random model
# ---------------------------------------------------------------------------------------------

_MODELS: dict = {}


def _model_for(tok):
    key = id(tok)
    if key not in _MODELS:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.5,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        _MODELS[key] = (LlamaForCausalLM(config).eval(), tok)
    return _MODELS[key][0]


def _check_answer(answer: str, text: str, types) -> list[tuple[str, str]]:
    """Strict grammar check: returns the entities or fails the test."""
    if answer == "没有":
        return []
    assert answer and not answer.startswith("\n"), repr(answer)
    body = answer[:-1] if answer.endswith("\n") else answer
    entities = []
    for line in body.split("\n"):
        entity, sep, etype = line.rpartition("_")
        assert sep and entity and etype in types, repr(answer)
        assert "_" not in entity and entity in text and entity == entity.strip(), repr(answer)
        entities.append((entity, etype))
    try:
        from cnqlora.metrics import parse_answer
    except ImportError:
        return entities
    parsed = parse_answer(answer, types)
    assert parsed.well_formed and set(parsed.entities) == set(entities), repr(answer)
    return entities


def _generate(tok, texts, max_new_tokens, do_sample, seed=0, extra=(), proc_max=None):
    model = _model_for(tok)
    prompts = [f"文本：{t}\n答案：" for t in texts]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_length = enc["input_ids"].shape[1]
    proc = GroundedNerLogitsProcessor(
        tok,
        texts=texts,
        types=TYPES,
        prompt_length=prompt_length,
        max_new_tokens=proc_max or max_new_tokens,
        eos_token_id=tok.eos_token_id,
    )
    sampling = {"top_k": 0, "top_p": 1.0, "temperature": 1.0} if do_sample else {}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=1,
            logits_processor=LogitsProcessorList([*extra, proc]),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **sampling,
        )
    gen = out[:, prompt_length:]
    answers = [tok.decode(row, skip_special_tokens=True) for row in gen]
    for row, answer, text in zip(gen.tolist(), answers, texts):
        _check_answer(answer, text, TYPES)
        assert tok.eos_token_id in row, (answer, row)  # the budget always leaves room for EOS
    return answers, proc


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("max_new_tokens", [12, 40])
def test_generate_always_parses(tokenizer, do_sample, max_new_tokens):
    answers, proc = _generate(tokenizer, TEXTS, max_new_tokens, do_sample)
    assert proc.min_new_tokens_required <= max_new_tokens
    if do_sample and max_new_tokens == 40:
        # A random model explores: it should not just say 没有 everywhere.
        assert any(a != "没有" for a in answers)


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_generate_many_seeds(kind, sp_model_path):
    tok = _get_tokenizer(kind, sp_model_path)
    lines = 0
    for seed in range(12):
        answers, _ = _generate(tok, TEXTS[:4], 24 + seed, do_sample=True, seed=seed)
        lines += sum(a.count("_") for a in answers)
    assert lines > 0


@pytest.mark.parametrize("kind", ["sp", "byte_level", "llama_fast"])
def test_generate_with_minimal_budget(kind, sp_model_path):
    tok = _get_tokenizer(kind, sp_model_path)
    probe = GroundedNerLogitsProcessor(tok, TEXTS, TYPES, prompt_length=0, max_new_tokens=1000)
    minimum = probe.min_new_tokens_required
    assert 2 <= minimum <= 7
    with pytest.raises(ValueError, match="too small"):
        GroundedNerLogitsProcessor(tok, TEXTS, TYPES, prompt_length=0, max_new_tokens=minimum - 1)
    for seed in range(3):
        _generate(tok, TEXTS, minimum, do_sample=True, seed=seed)
    _generate(tok, TEXTS, minimum, do_sample=False)
    # A processor budget below generate's still ends every row in time.
    _generate(tok, TEXTS, 30, do_sample=True, proc_max=minimum + 1)


class _Bias(LogitsProcessor):
    def __init__(self, token_ids, bias=1e4):
        self.token_ids = token_ids
        self.bias = bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_ids] += self.bias
        return scores


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_mask_overrides_a_biased_model(kind, sp_model_path):
    tok = _get_tokenizer(kind, sp_model_path)
    texts = ["北京大学的张三去了上海。", "李四在中国科学院工作。"]
    # Tokens the answers can never use: a character absent from both texts, and EOS (which is
    # invalid until a line is complete).
    wrong = tok.encode("鱻", add_special_tokens=False)[:1] + [tok.eos_token_id]
    model = _model_for(tok)
    enc = tok(
        [f"文本：{t}\n答案：" for t in texts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():
        free = model.generate(
            **enc,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([_Bias(wrong[:1])]),
        )
    assert (free[:, enc["input_ids"].shape[1] :] == wrong[0]).all()  # the bias does dominate
    for extra in ([_Bias(wrong[:1])], [_Bias(wrong[1:])], [_Bias(wrong)]):
        answers, _ = _generate(tok, texts, 20, do_sample=False, extra=extra)
        assert all(a for a in answers)


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_byte_fallback_entities(kind, sp_model_path):
    """Characters only spelled byte by byte (one outside the BMP) make it into entities intact."""
    tok = _get_tokenizer(kind, sp_model_path)
    table = token_byte_table(tok)
    rare = "鱻龘𠀋"
    wanted = [
        i
        for i, data in enumerate(table)
        if data is not None and len(data) == 1 and data in rare.encode()
    ]
    text = f"王五说{rare}是罕见字"
    answers, _ = _generate(tok, [text, "北京"], 24, do_sample=False, extra=[_Bias(wanted, 50.0)])
    assert any(ch in answers[0] for ch in rare), answers


def test_tokenizer_without_byte_fallback(tmp_path):
    """Whole-character pieces alone still give the guarantee (no byte pieces at all)."""
    from cnqlora.tiny import train_sentencepiece

    path = train_sentencepiece(CORPUS, str(tmp_path / "nobytes.model"), vocab_size=500, byte_fallback=False)
    tok = _SentencePieceTokenizer(
        vocab_file=path, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tok.padding_side = "left"
    trie = token_trie(tok)
    assert len(trie.missing_bytes) > 100
    texts = ["北京大学的张三去了上海。", "李四在中国科学院工作。", "清华大学位于北京市海淀区。"]
    for seed in range(4):
        _generate(tok, texts, 16, do_sample=True, seed=seed)
    _generate(tok, texts, 16, do_sample=False)


def test_wrong_prompt_length_is_reported(sp_model_path):
    tok = _get_tokenizer("sp", sp_model_path)
    proc = GroundedNerLogitsProcessor(tok, ["北京"], TYPES, prompt_length=3, max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt_length"):
        proc(torch.zeros((1, 5), dtype=torch.long), torch.zeros((1, len(tok))))
    with pytest.raises(ValueError, match="rows"):
        proc(torch.zeros((2, 3), dtype=torch.long), torch.zeros((2, len(tok))))


def test_beam_search_is_refused(sp_model_path):
    tok = _get_tokenizer("sp", sp_model_path)
    model = _model_for(tok)
    enc = tok(["文本：北京\n答案："], return_tensors="pt", add_special_tokens=False)
    procs = LogitsProcessorList(
        [grounded_processor_factory(tok, ["文本：北京"], TYPES)(enc["input_ids"], 10)]
    )
    with pytest.raises(ValueError, match="beam"):
        model.generate(
            **enc,
            max_new_tokens=10,
            num_beams=2,
            do_sample=False,
            logits_processor=procs,
            pad_token_id=tok.pad_token_id,
        )


def test_processor_is_incremental_and_resets(sp_model_path):
    """Driven by hand: state follows appended tokens, finished rows only allow EOS, reuse resets."""
    tok = _get_tokenizer("sp", sp_model_path)
    texts = ["北京大学", "张三"]
    proc = GroundedNerLogitsProcessor(tok, texts, TYPES, prompt_length=2, max_new_tokens=30)
    eos = tok.eos_token_id
    vocab = len(tok)
    ids = torch.zeros((2, 2), dtype=torch.long)
    answers = ["北京_地名", "没有"]
    seqs = [tok.encode(a, add_special_tokens=False) + [eos] for a in answers]
    steps = max(map(len, seqs)) + 2
    for step in range(steps):
        scores = proc(ids, torch.zeros((2, vocab)))
        nxt = []
        for row, seq in enumerate(seqs):
            want = seq[step] if step < len(seq) else tok.pad_token_id
            if step < len(seq):
                assert scores[row, want] == 0, (row, step)
            else:
                allowed = torch.isfinite(scores[row]).nonzero().flatten().tolist()
                assert allowed == [eos]
            nxt.append(want)
        ids = torch.cat([ids, torch.tensor(nxt)[:, None]], dim=1)
    assert proc.finished() == [True, True]
    # A new generation (no generated tokens) starts over.
    scores = proc(ids[:, :2], torch.zeros((2, vocab)))
    assert proc.finished() == [False, False] and not torch.isfinite(scores[:, eos]).any()
    # Rewriting history (what beam search does) is detected.
    proc(ids[:, :3], torch.zeros((2, vocab)))
    with pytest.raises(RuntimeError, match="beam"):
        proc(torch.cat([ids[:, :2], ids[:, 3:5]], dim=1), torch.zeros((2, vocab)))


def test_step_overhead(sp_model_path, tmp_path):
    """Per-step cost for batch 16 on a ~1,000-piece vocabulary (printed; loosely bounded)."""
    rng = random.Random(3)
    pool = [s[i : i + n] for s in CORPUS for n in (2, 3, 4) for i in range(0, len(s) - n)]
    synthetic = ["".join(rng.choice(pool) for _ in range(rng.randint(4, 12))) for _ in range(1500)]
    path = train_sentencepiece(CORPUS + synthetic, str(tmp_path / "big.model"), vocab_size=1000)
    tok = _SentencePieceTokenizer(
        vocab_file=path, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    vocab = len(tok)
    assert vocab >= 900
    texts = [CORPUS[i] + CORPUS[i + 1] + synthetic[i] for i in range(16)]
    steps = 40
    t0 = time.perf_counter()
    proc = GroundedNerLogitsProcessor(tok, texts, TYPES, prompt_length=1, max_new_tokens=steps)
    build = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros((16, 1), dtype=torch.long)
    timings = []
    for _ in range(steps):
        scores = torch.randn((16, vocab), generator=gen)
        t0 = time.perf_counter()
        masked = proc(ids, scores)
        timings.append(time.perf_counter() - t0)
        nxt = torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    assert all(tok.eos_token_id in row for row in ids.tolist())
    for row, text in zip(ids[:, 1:].tolist(), texts):
        _check_answer(tok.decode(row, skip_special_tokens=True), text, TYPES)
    per_step = 1000 * sum(timings) / len(timings)
    print(
        f"\ngrounded decoding: vocab {vocab}, batch 16, build {1000 * build:.1f} ms, "
        f"{per_step:.2f} ms/step mean, {1000 * max(timings):.2f} ms worst step"
    )
    assert per_step < 250


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_permits_is_membership_in_the_allowed_tokens(kind, sp_model_path):
    """The engine's cheap check against the full list, along random allowed paths and at every budget."""
    from cnqlora.grounded import GroundedAnswer

    tok = _get_tokenizer(kind, sp_model_path)
    vocab = len(tok) + 3  # ids past the tokenizer (padded embedding rows) are never allowed
    g = torch.Generator().manual_seed(0)
    for text in TEXTS[:3]:
        answer = GroundedAnswer(tok, text, TYPES, max_new_tokens=24)
        for generated in range(24 + 1):
            allowed = set(answer.allowed(generated, vocab).tolist())
            permitted = {t for t in range(vocab) if answer.permits(t, generated, vocab)}
            assert permitted == allowed, (text, generated)
            if generated == 24 or answer.state == -2:
                break
            choice = sorted(allowed)[int(torch.randint(len(allowed), (1,), generator=g))]
            answer.advance(choice)


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_a_lazy_answer_permits_what_the_built_automaton_allows(kind, sp_model_path):
    """A GroundedAnswer checks tokens before its automaton is built; along random allowed paths,
    at every budget, that check must permit exactly the tokens the built automaton allows."""
    from cnqlora.grounded import GroundedAnswer

    tok = _get_tokenizer(kind, sp_model_path)
    vocab = len(tok) + 3
    g = torch.Generator().manual_seed(1)
    lazy_checks = 0
    for text in TEXTS[:3]:
        for budget in (24, 60):
            full = GroundedAnswer(tok, text, TYPES, max_new_tokens=budget)
            full.allowed(0, vocab)  # built from the start
            for generated in range(budget + 1):
                allowed = set(full.allowed(generated, vocab).tolist())
                for token in sorted(allowed)[:20] + [t for t in range(vocab) if t not in allowed][::13]:
                    # a fresh lazy answer walked to the same point: each check starts unbuilt
                    lazy = GroundedAnswer(tok, text, TYPES, max_new_tokens=budget)
                    for t in path if generated else []:
                        lazy.advance(t)
                    unbuilt = lazy._full is None
                    assert lazy.permits(token, generated, vocab) == (token in allowed), (text, generated, token)
                    lazy_checks += unbuilt
                if generated == budget or full.state == -2:
                    break
                choice = sorted(allowed)[int(torch.randint(len(allowed), (1,), generator=g))]
                full.advance(choice)
                path = [*(path if generated else []), choice]
    assert lazy_checks > 1000  # most checks ran on the lazy path, not the fallback


@pytest.mark.parametrize("kind", ["sp", "byte_level"])
def test_a_lazy_answer_follows_an_entity_to_a_later_occurrence(kind, sp_model_path):
    """The lazy answer keeps one occurrence of the entity so far; when the next byte does not
    continue it, the entity must move to a later occurrence (上海人 only exists at the second
    上海), and the automaton built afterwards must start from the same state."""
    from cnqlora.grounded import GroundedAnswer

    tok = _get_tokenizer(kind, sp_model_path)
    vocab = len(tok)
    text = "上海大学和上海人民公园，上海"
    answer = "上海人民公园_地名\n上海大学_机构名\n上海_地名"
    tokens = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    full = GroundedAnswer(tok, text, TYPES, max_new_tokens=64)
    full.allowed(0, vocab)
    lazy = GroundedAnswer(tok, text, TYPES, max_new_tokens=64)
    for k, token in enumerate(tokens):
        allowed = set(full.allowed(k, vocab).tolist())
        assert token in allowed and lazy.permits(token, k, vocab), (k, token)
        # the refused tokens too: the next character of the wrong occurrence is not an entity
        for other in [t for t in range(vocab) if t not in allowed][::29]:
            assert not lazy.permits(other, k, vocab), (k, other)
        full.advance(token)
        lazy.advance(token)
        midway = GroundedAnswer(tok, text, TYPES, max_new_tokens=64)
        for t in tokens[:k + 1]:
            midway.advance(t)
        assert midway._full is None and midway.state == full.state, k  # built from the lazy key
    assert lazy._full is None  # the whole answer was checked without the automaton
    for bad in ("上海人大_地名", "公园上海_地名", "海学_地名"):  # not in the text
        lazy = GroundedAnswer(tok, text, TYPES, max_new_tokens=64)
        ids = tok.encode(bad, add_special_tokens=False)
        assert not all(lazy.permits(t, k, vocab) and lazy.advance(t) is None for k, t in enumerate(ids)), bad
