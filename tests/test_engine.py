"""The generation engine against `model.generate`: same greedy tokens, whatever runs beside them."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from cnqlora.engine import Engine, Request, Sampling, accumulate_stats, supported


def _random_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases, grouped-query attention, another RoPE base
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _reference(model, prompts, max_new_tokens, stop, processor=None):
    """Each prompt alone through model.generate (no padding at all), stop token removed."""
    from transformers import LogitsProcessorList

    out = []
    for i, prompt in enumerate(prompts):
        kwargs = {}
        if processor is not None:
            kwargs["logits_processor"] = LogitsProcessorList([processor(i, len(prompt))])
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=0, **kwargs)[0, len(prompt):].tolist()
        out.append(ids[:ids.index(stop)] if stop in ids else ids)
    return out


def _stop_token_ending_rows_at_different_steps(model, prompts, max_new_tokens):
    """A token that the greedy answers first produce at many different steps: as EOS, rows end unevenly."""
    free = _reference(model, prompts, max_new_tokens, stop=-1)
    first: dict[int, set[int]] = {}
    for row in free:
        for step, token in enumerate(row):
            if row.index(token) == step:
                first.setdefault(token, set()).add(step)
    return max(first, key=lambda t: (len(first[t]), -t))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("max_batch,fixed_shapes", [(64, False), (3, False), (3, True)])
def test_greedy_tokens_equal_generate_for_mixed_lengths_and_uneven_ends(kind, max_batch, fixed_shapes):
    model = _random_model(kind)
    prompts = _prompts(10, 300)
    stop = _stop_token_ending_rows_at_different_steps(model, prompts, 20)
    expected = _reference(model, prompts, 20, stop)
    assert len({len(e) for e in expected}) >= 3  # rows really end at different steps
    engine = Engine(model, [stop], pad_id=0, max_batch=max_batch, prefill_tokens=64, prefill_graphs=fixed_shapes)
    got = engine.generate([Request(p, 20) for p in prompts])
    assert got == expected
    stats = engine.last_stats
    assert stats["slots"] == min(max_batch, 10)
    if max_batch == 3:
        assert stats["prefill_calls"] > 3  # slots were refilled as rows finished


def test_requests_of_their_own_lengths_and_limits(tiny_ner_model_dir):
    model = _random_model("llama")
    prompts = _prompts(6, 300, seed=1)
    limits = [1, 3, 7, 12, 2, 9]
    engine = Engine(model, [2], pad_id=0, max_batch=2)
    got = engine.generate([Request(p, n) for p, n in zip(prompts, limits)])
    for prompt, limit, tokens in zip(prompts, limits, got):
        assert tokens == _reference(model, [prompt], limit, stop=2)[0]
        assert len(tokens) <= limit


def test_qlora_model_with_adapter_equals_generate(tiny_ner_model_dir, tmp_path):
    """The real inference path: NF4 base + peft LoRA (random B), through load_for_inference."""
    from cnqlora.data import PromptArgs, encode_prompt
    from cnqlora.generation import GenerationArgs, generate_ids
    from cnqlora.inference import load_for_inference
    from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model, load_tokenizer
    from cnqlora.training import save_adapter

    torch.manual_seed(0)
    model_args = ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")
    lora, _ = attach_lora(load_model(model_args), LoraArgs())
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = save_adapter(lora, load_tokenizer(tiny_ner_model_dir), str(tmp_path / "adapter"), "x: 1\n")
    loaded = load_for_inference(model_args, PromptArgs(), adapter)
    texts = ["张伟在北京工作", "上海", "中国人工智能学会在南京开会，李明参加了", "今天天气很好"]
    prompts = [encode_prompt(loaded.tokenizer, loaded.template, "找出实体", "文本：" + t).ids for t in texts]
    gen = GenerationArgs(max_new_tokens=16)
    expected = [generate_ids(loaded.model, loaded.tokenizer, [p], gen)[0] for p in prompts]
    engine = Engine(loaded.model, [loaded.tokenizer.eos_token_id], pad_id=loaded.tokenizer.pad_token_id, max_batch=2)
    assert engine.generate([Request(p, 16) for p in prompts]) == expected


@pytest.mark.parametrize("candidates", [(400,), (1, 400), (1,), ()])
def test_grounded_constraint_equals_the_grounded_processor(tiny_ner_model_dir, candidates):
    """A refused token is replaced from the row's top tokens (400 of the tiny vocabulary's 1,200:
    a random model's allowed tokens are rarely among fewer; (1, 400): the argmax, refused, then
    the top 400), or from the full mask of allowed tokens ((1,): only the refused argmax is
    tried; (): always the mask)."""
    from cnqlora.grounded import GroundedAnswer, GroundedNerLogitsProcessor
    from cnqlora.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    torch.manual_seed(0)
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu", quantization="none")).eval()
    texts = ["张伟在北京工作", "上海很大", "中国人工智能学会在南京开会"]
    types = ["人名", "地名", "机构名"]
    prompts = [tokenizer.encode("文本：" + t, add_special_tokens=False) for t in texts]
    eos = tokenizer.eos_token_id
    expected = _reference(model, prompts, 24, eos, processor=lambda i, n: GroundedNerLogitsProcessor(
        tokenizer, texts=[texts[i]], types=types, prompt_length=n, max_new_tokens=24))
    shared: dict = {}
    requests = [Request(p, 24, GroundedAnswer(tokenizer, t, types, 24, shared=shared)) for p, t in zip(prompts, texts)]
    engine = Engine(model, [eos], pad_id=tokenizer.pad_token_id, max_batch=2)
    engine.rewind_candidates = candidates
    got = engine.generate(requests)
    assert got == expected
    # the random model's own choices are often refused: each refusal re-decoded its step masked
    rewinds, masked = engine.last_stats["rewinds"], engine.last_stats["masked_rows"]
    assert rewinds > 3
    if 400 in candidates:
        assert masked < rewinds / 2  # most refusals found their token among the top ones
    else:
        assert masked == rewinds
    # every answer is a complete, grounded one (the budget ended each on EOS, within 24 tokens)
    for request, tokens in zip(requests, got):
        assert request.constraint.text.grammar.accepts(tokenizer.decode(tokens, skip_special_tokens=True))


def test_rare_steps_that_are_not_greedy_run_eagerly_before_a_graph_is_captured(tiny_ner_model_dir, monkeypatch):
    """CUDA graphs on the CPU, faked: a graphed step is recorded and run eagerly. A grounded run's
    few refused tokens make steps that are not greedy; they must not cost a graph capture each
    run, while a sampling run (every step not greedy) gets its graph after a few steps."""
    from cnqlora.grounded import GroundedAnswer
    from cnqlora.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    torch.manual_seed(0)
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu", quantization="none")).eval()
    graphed: list[tuple[int, bool]] = []

    def fake_graphed(self, span, greedy):
        graphed.append((span, greedy))
        return self._step(span, greedy)

    monkeypatch.setattr(Engine, "_step_graphed", fake_graphed)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    texts = ["张伟在北京工作", "上海很大"]
    prompts = [tokenizer.encode("文本：" + t, add_special_tokens=False) for t in texts]
    eos = tokenizer.eos_token_id

    def run(eager_before_graph: int, sampling: Sampling | None = None):
        engine = Engine(model, [eos], pad_id=tokenizer.pad_token_id, max_batch=2, sampling=sampling)
        engine.cuda_graphs, engine.eager_before_graph = True, eager_before_graph
        shared: dict = {}
        grounded = sampling is None
        requests = [Request(p, 24, GroundedAnswer(tokenizer, t, ["人名", "地名"], 24, shared=shared) if grounded
                            else None) for p, t in zip(prompts, texts)]
        graphed.clear()
        answers = engine.generate(requests)
        return answers, engine.last_stats, list(graphed)

    eager, stats, steps = run(10**6)
    # greedy steps are graphed from their first use; the refusals' steps stayed eager
    refusal_steps = stats["decode_steps"] - len(steps)
    assert stats["rewinds"] > 3 and refusal_steps > 3 and all(greedy for _, greedy in steps)
    graphs_at_once, stats, steps = run(0)
    assert graphs_at_once == eager and len(steps) == stats["decode_steps"]
    assert sum(not greedy for _, greedy in steps) == refusal_steps
    _, stats, steps = run(3, Sampling(do_sample=True, temperature=1.0))
    spans = {span for span, _ in steps}
    assert steps and not any(greedy for _, greedy in steps)
    assert len(steps) == stats["decode_steps"] - 3 * len(spans)  # each span's first 3 steps eager


def test_stats_of_several_runs_add_counts_and_keep_the_last_sizes():
    """A file over one window is several engine runs: its reported steps and seconds are their sums."""
    model = _random_model("llama")
    engine = Engine(model, [2], pad_id=0, max_batch=2)
    total: dict = {}
    runs = []
    for seed, n in ((4, 3), (5, 1)):
        engine.generate([Request(p, 6) for p in _prompts(n, 300, seed=seed)])
        runs.append(dict(engine.last_stats))
        accumulate_stats(total, engine.last_stats)
    assert total["decode_steps"] == runs[0]["decode_steps"] + runs[1]["decode_steps"]
    assert total["prefill_calls"] == runs[0]["prefill_calls"] + runs[1]["prefill_calls"]
    assert total["wall_s"] == runs[0]["wall_s"] + runs[1]["wall_s"]
    assert runs[0]["slots"] != runs[1]["slots"] and total["slots"] == runs[1]["slots"]
    assert total["kv_gib"] == runs[1]["kv_gib"]


def test_streamed_tokens_are_the_final_answers():
    model = _random_model("llama")
    prompts = _prompts(5, 300, seed=2)
    streamed: dict[int, list[int]] = {}
    finished_order = []
    engine = Engine(model, [2], pad_id=0, max_batch=2)
    for index, tokens in engine.run([Request(p, 10) for p in prompts],
                                    on_token=lambda i, t: streamed.setdefault(i, []).append(t)):
        finished_order.append(index)
        assert streamed.get(index, []) == tokens
    assert sorted(finished_order) == list(range(5))
    assert engine.k is None  # the cache is released with the last request


def test_sampling_is_reproducible_and_respects_top_k():
    model = _random_model("llama")
    prompts = _prompts(4, 300, seed=3)
    sampling = Sampling(do_sample=True, temperature=1.0, top_k=1)
    engine = Engine(model, [2], pad_id=0, sampling=sampling)
    # top_k=1 is greedy whatever the seed
    assert engine.generate([Request(p, 8) for p in prompts]) == _reference(model, prompts, 8, stop=2)
    engine.sampling = Sampling(do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(5)
    a = engine.generate([Request(p, 8) for p in prompts])
    torch.manual_seed(5)
    assert engine.generate([Request(p, 8) for p in prompts]) == a


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "gpt2" in supported(model)
    with pytest.raises(ValueError, match="cannot run this model"):
        Engine(model, [0], pad_id=0)


# --------------------------------------------------------------------------- through the commands

from test_predict import predict_argv  # noqa: E402


@pytest.mark.parametrize("grounded", [False, True])
def test_predict_file_gives_the_same_answers_with_the_engine_and_with_generate(tiny_ner_model_dir, adapter_dir,
                                                                               ner_data_dir, tmp_path, grounded):
    import json

    import predict
    from cnqlora.cli import run_command

    rows = {}
    for engine in ("auto", "hf"):
        out = str(tmp_path / f"{engine}.jsonl")
        extra = ["--limit", "12", "--max_new_tokens", "24", "--engine", engine] + (["--grounded"] if grounded else [])
        assert run_command(predict.main, predict_argv(tiny_ner_model_dir, adapter_dir, f"{ner_data_dir}/test.txt",
                                                      out, *extra)) == 0
        rows[engine] = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["output"] for r in rows["auto"]] == [r["output"] for r in rows["hf"]]
    assert [r["line"] for r in rows["auto"]] == list(range(1, 13))  # input order, whatever the finishing order


def test_the_dev_f1_evaluator_scores_the_same_with_the_engine_and_with_generate(tiny_ner_model_dir, ner_data_dir,
                                                                               monkeypatch):
    import json

    from cnqlora import engine
    from cnqlora.evaluation import DevNerEvaluator
    from cnqlora.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"))
    with open(f"{ner_data_dir}/dev.txt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:10]
    slots = []
    init = engine.Engine.__init__
    monkeypatch.setattr(engine.Engine, "__init__",
                        lambda self, *a, **k: slots.append(k["max_batch"]) or init(self, *a, **k))
    evaluator = DevNerEvaluator(tokenizer, "baichuan", records, batch_size=4, max_new_tokens=12, engine_slots=7)
    with_engine = evaluator(model)
    assert slots == [7]  # the engine's slots, not generate's batch size
    evaluator.gen.engine = "hf"
    assert evaluator(model) == with_engine


def test_an_adapter_merged_in_memory_predicts_as_the_merged_folder(tiny_ner_model_dir, adapter_dir, ner_data_dir,
                                                                  tmp_path):
    import json

    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    import predict
    from cnqlora.cli import run_command
    from cnqlora.data import PromptArgs
    from cnqlora.inference import load_for_inference
    from cnqlora.models import ModelArgs

    model_args = ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")
    merged = load_for_inference(model_args, PromptArgs(), adapter_dir, adapter_mode="merged")
    assert "(merged in memory)" in merged.description and ", none," in merged.description
    assert not any(isinstance(m, (LoraLayer, bnb.nn.Linear4bit)) for m in merged.model.modules())
    # auto keeps the 4-bit base + LoRA on the CPU, where the 16-bit copy would only cost memory
    auto = load_for_inference(model_args, PromptArgs(), adapter_dir, adapter_mode="auto")
    assert "merged in memory" not in auto.description
    assert any(isinstance(m, LoraLayer) for m in auto.model.modules())

    folder = str(tmp_path / "merged")
    assert run_command(predict.main, ["--base_model", tiny_ner_model_dir, "--lora_model", adapter_dir, "--only_cpu",
                                      "--merge_to", folder, "--merge_dtype", "float32"]) == 0
    outputs = {}
    for name, extra in (("memory", ["--lora_model", adapter_dir, "--adapter_mode", "merged"]),
                        ("folder", ["--template", "baichuan", "--quantization", "none"])):
        out = str(tmp_path / f"{name}.jsonl")
        base = tiny_ner_model_dir if name == "memory" else folder
        assert run_command(predict.main, ["--base_model", base, "--data_file", f"{ner_data_dir}/test.txt",
                                          "--predictions_file", out, "--only_cpu", "--limit", "8",
                                          "--max_new_tokens", "16", *extra]) == 0
        outputs[name] = [json.loads(line)["output"] for line in open(out, encoding="utf-8")]
    assert outputs["memory"] == outputs["folder"]


# --------------------------------------------------------------------------- requests arriving while it runs

def test_a_feed_filled_while_the_engine_runs_gives_each_request_its_own_answer():
    import threading

    from cnqlora.engine import Feed

    model = _random_model("llama")
    prompts = _prompts(7, 300, seed=4)
    expected = _reference(model, prompts, 12, stop=2)
    feed = Feed()
    engine = Engine(model, [2], pad_id=0, max_batch=3)
    first = [feed.put(Request(p, 12)) for p in prompts[:2]]
    got: dict[int, list[int]] = {}

    def late():  # the rest arrive once the first answers are being decoded
        started.wait()
        for p in prompts[2:]:
            feed.put(Request(p, 12))
        feed.close()

    started = threading.Event()
    thread = threading.Thread(target=late)
    thread.start()
    for index, tokens in engine.run(feed, on_token=lambda i, t: started.set(), max_len=64):
        got[index] = tokens
    thread.join()
    assert first == [0, 1]
    assert [got[i] for i in range(7)] == expected
    assert engine.k is None


def test_a_cancelled_request_frees_its_slot_for_the_next():
    from cnqlora.engine import Feed

    model = _random_model("llama")
    prompts = _prompts(3, 300, seed=5)
    feed = Feed()
    engine = Engine(model, [], pad_id=0, max_batch=1)  # one slot: the others wait for it
    doomed = Request(prompts[0], 40)
    feed.put(doomed)
    feed.put(Request(prompts[1], 5))
    feed.put(Request(prompts[2], 5))
    feed.close()

    def cancel(index, token):
        if index == 0:
            doomed.cancelled = True

    got = dict(engine.run(feed, on_token=cancel, max_len=64))
    assert 1 <= len(got[0]) < 40  # stopped after its first tokens, not run to its limit
    assert got[1] == _reference(model, [prompts[1]], 5, stop=-1)[0]
    assert got[2] == _reference(model, [prompts[2]], 5, stop=-1)[0]


def test_a_full_or_closed_feed_refuses_requests():
    from cnqlora.engine import Closed, Feed, Full

    feed = Feed(max_waiting=1)
    feed.put(Request([5, 6], 2))
    with pytest.raises(Full):
        feed.put(Request([5, 6], 2))
    closed = Feed()
    closed.close()
    with pytest.raises(Closed):
        closed.put(Request([5], 1))
    with pytest.raises(ValueError):
        Feed().put(Request([], 1))


def test_a_seeded_request_samples_the_same_alone_and_among_others():
    model = _random_model("llama")
    prompts = _prompts(5, 300, seed=6)
    sampling = Sampling(do_sample=True, temperature=1.5, top_p=0.95)
    engine = Engine(model, [2], pad_id=0)
    alone = engine.generate([Request(prompts[0], 10, sampling=sampling, seed=7)])[0]
    torch.manual_seed(123)  # what the others draw from must not matter
    crowd = engine.generate([Request(prompts[0], 10, sampling=sampling, seed=7)]
                            + [Request(p, 10, sampling=sampling) for p in prompts[1:]])
    assert crowd[0] == alone
    other_seed = engine.generate([Request(prompts[0], 10, sampling=sampling, seed=8)])[0]
    assert other_seed != alone
    # greedy requests beside sampled ones stay greedy
    mixed = engine.generate([Request(prompts[1], 10), Request(prompts[2], 10, sampling=sampling, seed=1)])
    assert mixed[0] == _reference(model, [prompts[1]], 10, stop=2)[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(kind, fixed_shapes):
    model = _random_model(kind)
    g = torch.Generator().manual_seed(9)
    head = torch.randint(3, 300, (20,), generator=g).tolist()
    # tails of 1 to 25 tokens, one of them the shortest possible (the prefix plus one token)
    prompts = [head + t for t in _prompts(8, 300, seed=8)] + [head + [7]]
    stop = _stop_token_ending_rows_at_different_steps(model, prompts, 16)
    expected = _reference(model, prompts, 16, stop)
    # fixed_shapes: the prefill padded to the shapes its CUDA graphs have on a GPU, run eagerly
    engine = Engine(model, [stop], pad_id=0, max_batch=4, prefill_tokens=48, prefill_graphs=fixed_shapes)
    assert engine.generate([Request(p, 16) for p in prompts]) == expected
    assert engine.last_stats["shared_prefix"] == 20
    assert (engine.last_stats["prefill_graph_calls"] > 0) == fixed_shapes
    assert engine.last_stats["prefill_calls"] > 2  # later prefills reuse the prefix too
    engine.shared_prefix_min = 0  # off: the same answers, the whole prompts prefilled
    assert engine.generate([Request(p, 16) for p in prompts]) == expected
    assert engine.last_stats["shared_prefix"] == 0


def test_prompts_sharing_too_little_are_prefilled_whole():
    from cnqlora.engine import _shared_prefix

    assert _shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert _shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # each prompt keeps a token of its own
    assert _shared_prefix([[4, 5], [6, 5]]) == []
    model = _random_model("llama")
    engine = Engine(model, [2], pad_id=0)
    engine.generate([Request([5] * 10 + [6], 2), Request([5] * 10 + [7], 2)])
    assert engine.last_stats["shared_prefix"] == 0  # 10 shared tokens: below shared_prefix_min (16)


@pytest.mark.parametrize("length", [1, 5])
def test_grouped_query_attention_with_a_mask_equals_repeated_keys(length):
    # The engine stacks the query heads sharing a key head instead of copying keys per head; the
    # result must be what attention over repeated keys gives, head by head.
    import torch.nn.functional as F

    from cnqlora.engine import _attention

    g = torch.Generator().manual_seed(0)
    batch, heads, kv, keys, dim = 3, 6, 2, 9, 8
    q = torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2)  # strided, as the engine's
    k, v = torch.randn(2, batch, kv, keys, dim, generator=g)
    if length == 1:  # decode: each row sees its own number of keys
        mask = (torch.arange(keys)[None, :] <= torch.tensor([2, 8, 5])[:, None])[:, None, None, :]
    else:  # prefill after a prefix of 4 keys: causal over the rest
        mask = torch.arange(keys)[None, :] <= torch.arange(4, keys)[:, None]
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
                                              attn_mask=mask, scale=0.3)
    got = _attention(q, k, v, mask=mask, scale=0.3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
