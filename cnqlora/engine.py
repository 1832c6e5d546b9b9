"""The generation engine: continuous batching over a static, slot-based KV cache.

`model.generate` on a batch runs every row until the longest answer of the batch is done, and
MSRA answers run from 2 to 231 tokens, so most rows of a batch idle most of the time. Here the
KV cache has a fixed number of slots; a request occupies one from its prefill to its EOS, and a
freed slot is refilled from the queue at the next step. Prompts are prefilled together, as many
as a token budget allows, and each decode step runs every slot at once.

The engine does not re-implement the model: it calls the model's own modules (embedding, norms,
the q/k/v or fused W_pack projections, MLP, LM head), so 4-bit layers and peft's LoRA layers
work unchanged, and only attention over the slot cache is its own. That covers the LLaMA family
(LLaMA, Qwen2, Mistral without a sliding window, Baichuan-7B/Baichuan2-7B); `supported` says why
another model is not, and callers then fall back to `model.generate`.

Greedy answers equal `model.generate`'s token for token (tests/test_engine.py): each row attends
only to its own cache slot, so its answer does not depend on what else is being decoded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "baichuan")


@dataclass
class Request:
    """One prompt to answer. `constraint` (e.g. grounded.GroundedAnswer) limits the tokens allowed."""

    prompt: Sequence[int]
    max_new_tokens: int
    constraint: Any = None


@dataclass
class Sampling:
    """Greedy when do_sample is off; else temperature, then top-k, then top-p (as in generate)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def supported(model) -> str | None:
    """Why the engine cannot run this model (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "use_sliding_window", False) or (model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention is not implemented by the engine"
    layers = base.get_decoder().layers
    attn = layers[0].self_attn
    if not (hasattr(attn, "W_pack") or all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))):
        return "its attention has neither W_pack nor q/k/v_proj"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "q/k normalisation is not implemented by the engine"
    return None


class _Model:
    """The pieces of a LLaMA-family causal LM that one forward pass over the slot cache needs."""

    def __init__(self, model) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        decoder = base.get_decoder()
        self.embed = decoder.embed_tokens
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.head = base.get_output_embeddings()
        self.rope = apply_rotary_pos_emb
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scaling = getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device

    def qkv(self, attn, x):
        batch, length, _ = x.shape
        if hasattr(attn, "W_pack"):
            q, k, v = attn.W_pack(x).split([self.n_heads * self.head_dim] * 3, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v


def _attention(q, k, v, mask=None, causal=False, scale=None):
    import torch.nn.functional as F

    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass
class _Slot:
    index: int  # the request's position in the list given to run()
    request: Request
    tokens: list[int] = field(default_factory=list)


class Engine:
    """Decodes many requests through `slots` cache slots; see the module docstring."""

    def __init__(self, model, stop_ids: Sequence[int], pad_id: int, *, max_batch: int = 256,
                 prefill_tokens: int = 16384, kv_memory_fraction: float = 0.5, kv_max_gib: float | None = None,
                 sampling: Sampling | None = None, length_step: int = 64, cuda_graphs: bool = True) -> None:
        reason = supported(model)
        if reason:
            raise ValueError(f"the generation engine cannot run this model: {reason}")
        self.m = _Model(model)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.kv_memory_fraction = kv_memory_fraction
        self.kv_max_gib = kv_max_gib
        self.sampling = sampling or Sampling()
        self.length_step = length_step
        self.cuda_graphs = cuda_graphs and self.m.device.type == "cuda"
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ memory

    def _slot_bytes(self, max_len: int) -> int:
        import torch

        itemsize = torch.empty((), dtype=self.m.dtype).element_size()
        return 2 * len(self.m.layers) * self.m.n_kv * max_len * self.m.head_dim * itemsize

    def plan_slots(self, wanted: int, max_len: int) -> int:
        """Slots that fit: on a GPU, kv_memory_fraction of the free memory (capped at kv_max_gib)."""
        import torch

        slots = max(1, min(wanted, self.max_batch))
        if self.m.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.m.device)
            budget = free * self.kv_memory_fraction
            if self.kv_max_gib is not None:
                budget = min(budget, self.kv_max_gib * 2**30)
            slots = max(1, min(slots, int(budget // self._slot_bytes(max_len))))
        return slots

    # ------------------------------------------------------------------ the passes

    def _forward(self, ids, positions, write: Callable, attend: Callable):
        """Hidden states after the last norm; `write(layer, k, v)` stores, `attend(layer, q, k, v)` attends."""
        m = self.m
        h = m.embed(ids)
        cos, sin = m.rotary(h, positions)
        batch, length, _ = h.shape
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = m.qkv(attn, layer.input_layernorm(h))
            q, k = m.rope(q, k, cos, sin)
            write(i, k, v)
            o = attend(i, q, k, v)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.norm(h)

    def _prefill(self, slots: list[int], prompts: list[Sequence[int]]):
        """Run the prompts (right padded) into their slots; return the logits of each last token."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        ids = ids.to(self.m.device)
        positions = torch.arange(width, device=self.m.device).expand(len(prompts), width)
        index = torch.as_tensor(slots, device=self.m.device)

        def write(i, k, v):
            self.k[i][index, :, :width] = k
            self.v[i][index, :, :width] = v

        # Right padding: causal attention alone keeps every real token from seeing the padding.
        hidden = self._forward(ids, positions, write,
                               lambda i, q, k, v: _attention(q, k, v, causal=True, scale=self.m.scaling))
        last = torch.as_tensor([len(p) - 1 for p in prompts], device=self.m.device)
        return self.m.head(hidden[torch.arange(len(prompts), device=self.m.device), last])

    def _decode(self, tokens, positions, rows: int, span: int):
        """One token for slots [0, rows): each at its own position, attending to its first `span` keys."""
        import torch

        arange = torch.arange(rows, device=self.m.device)
        mask = (torch.arange(span, device=self.m.device)[None, :] <= positions[:, None])[:, None, None, :]

        def write(i, k, v):
            self.k[i][arange, :, positions] = k[:, :, 0]
            self.v[i][arange, :, positions] = v[:, :, 0]

        def attend(i, q, k, v):
            return _attention(q, self.k[i][:rows, :, :span], self.v[i][:rows, :, :span], mask=mask,
                              scale=self.m.scaling)

        hidden = self._forward(tokens[:, None], positions[:, None], write, attend)
        return self.m.head(hidden[:, 0])

    def _decode_graphed(self, tokens, positions, span: int):
        """_decode over every slot, replayed from a CUDA graph per `span`.

        A decode step of a small model is hundreds of short kernels; launched one by one from
        Python they take longer than they run. Every slot is decoded (idle ones on a pad at
        position 0), so one graph per span serves every step.
        """
        import torch

        graph = self._graphs.get(span)
        if graph is None:
            self._tokens.copy_(tokens)
            self._positions.copy_(positions)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs require
                self._decode(self._tokens, self._positions, len(tokens), span)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._decode(self._tokens, self._positions, len(tokens), span)
            self._graphs[span] = graph = (graph, out)
        self._tokens.copy_(tokens)
        self._positions.copy_(positions)
        graph[0].replay()
        return graph[1]

    # ------------------------------------------------------------------ choosing tokens

    def _choose(self, logits, slots: list[_Slot | None]) -> list[int]:
        import torch

        logits = logits.float()
        limited = [(row, s) for row, s in enumerate(slots) if s is not None and s.request.constraint is not None]
        if limited:
            vocab = logits.shape[-1]
            rows, cols = [], []
            for row, s in limited:
                allowed = s.request.constraint.allowed(len(s.tokens), vocab)
                rows.append(torch.full((len(allowed),), row, dtype=torch.long))
                cols.append(allowed)
            r = torch.cat(rows).to(logits.device)
            c = torch.cat(cols).to(logits.device)
            keep = torch.as_tensor([row for row, _ in limited], device=logits.device)
            masked = torch.full_like(logits[keep], float("-inf"))
            lookup = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
            lookup[keep] = torch.arange(len(limited), device=logits.device)
            masked[lookup[r], c] = logits[r, c]
            logits[keep] = masked
        if not self.sampling.do_sample:
            return logits.argmax(dim=-1).tolist()
        return _sample(logits, self.sampling).tolist()

    # ------------------------------------------------------------------ the loop

    def run(self, requests: Sequence[Request],
            on_token: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, new tokens without the stop token) as each request finishes.

        `on_token(index, token)` sees every token as it is chosen (streaming). The cache is
        allocated for these requests and freed when the last one is done.
        """
        import torch

        if not requests:
            return
        for r in requests:
            if r.max_new_tokens < 1 or not len(r.prompt):
                raise ValueError("every request needs a prompt and max_new_tokens >= 1")
        max_len = _round_up(max(len(r.prompt) + r.max_new_tokens for r in requests), self.length_step)
        n_slots = self.plan_slots(len(requests), max_len)
        shape = (n_slots, self.m.n_kv, max_len, self.m.head_dim)
        self.k = [torch.zeros(shape, dtype=self.m.dtype, device=self.m.device) for _ in self.m.layers]
        self.v = [torch.zeros(shape, dtype=self.m.dtype, device=self.m.device) for _ in self.m.layers]
        # Longest prompts first: they are the ones whose padding would cost most if mixed, and a
        # long answer started late is what makes the tail of a run.
        queue = deque(sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt)))
        slots: list[_Slot | None] = [None] * n_slots
        length = [0] * n_slots  # tokens in each slot's cache; the next one goes at this position
        last = [self.pad_id] * n_slots  # each slot's newest token, the next decode step's input
        stats = {"slots": n_slots, "max_len": max_len, "prefill_calls": 0, "decode_steps": 0,
                 "kv_gib": n_slots * self._slot_bytes(max_len) / 2**30, "prefill_s": 0.0, "decode_s": 0.0,
                 "cuda_graphs": self.cuda_graphs}
        graphs = self.cuda_graphs
        if graphs:
            self._graphs: dict[int, Any] = {}
            self._pool = torch.cuda.graph_pool_handle()
            self._tokens = torch.zeros(n_slots, dtype=torch.long, device=self.m.device)
            self._positions = torch.zeros(n_slots, dtype=torch.long, device=self.m.device)
        self.last_stats = stats

        def emit(slot: int, token: int) -> tuple[int, list[int]] | None:
            s = slots[slot]
            if token in self.stop_ids:
                done = True
            else:
                s.tokens.append(token)
                if s.request.constraint is not None:
                    s.request.constraint.advance(token)
                if on_token is not None:
                    on_token(s.index, token)
                done = len(s.tokens) >= s.request.max_new_tokens
            if done:
                slots[slot] = None
                return s.index, s.tokens
            last[slot] = token
            return None

        try:
            with torch.inference_mode():
                while queue or any(s is not None for s in slots):
                    free = [i for i, s in enumerate(slots) if s is None]
                    # Refill when enough slots are free to make a worthwhile prefill batch (or at the end).
                    if free and queue and (len(free) >= min(len(queue), max(1, n_slots // 8))
                                           or all(s is None for s in slots)):
                        chosen: list[int] = []
                        while queue and len(chosen) < len(free):
                            # padded to the first chosen, the longest: the queue is longest first
                            width = len(requests[chosen[0] if chosen else queue[0]].prompt)
                            if chosen and (len(chosen) + 1) * width > self.prefill_tokens:
                                break
                            chosen.append(queue.popleft())
                        targets = free[:len(chosen)]
                        for slot, index in zip(targets, chosen):
                            slots[slot] = _Slot(index, requests[index])
                            length[slot] = len(requests[index].prompt)
                        began = time.perf_counter()
                        logits = self._prefill(targets, [requests[i].prompt for i in chosen])
                        stats["prefill_calls"] += 1
                        view = [slots[t] for t in targets]
                        chosen_tokens = self._choose(logits, view)  # waits for the GPU: the time is the prefill's
                        stats["prefill_s"] += time.perf_counter() - began
                        for slot, token in zip(targets, chosen_tokens):
                            finished = emit(slot, token)
                            if finished:
                                yield finished
                        continue
                    active = [i for i, s in enumerate(slots) if s is not None]
                    if not active:
                        continue
                    rows = n_slots if graphs else active[-1] + 1
                    span = min(max_len, _round_up(max(length[i] for i in active) + 1, self.length_step))
                    # Idle slots below `rows` decode a pad at position 0: harmless, their cache is rewritten
                    # by their next prefill, and it keeps every step one batch of fixed layout.
                    tokens = torch.as_tensor([last[i] if slots[i] else self.pad_id for i in range(rows)],
                                             device=self.m.device)
                    positions = torch.as_tensor([length[i] if slots[i] else 0 for i in range(rows)],
                                                device=self.m.device)
                    began = time.perf_counter()
                    if graphs:
                        try:
                            logits = self._decode_graphed(tokens, positions, span)
                        except RuntimeError as e:  # a layer that cannot be captured: decode eagerly from now on
                            graphs = self.cuda_graphs = False
                            stats["cuda_graphs"] = f"off: {type(e).__name__}: {str(e)[:200]}"
                            self._graphs = {}
                            logits = self._decode(tokens, positions, rows, span)
                    else:
                        logits = self._decode(tokens, positions, rows, span)
                    stats["decode_steps"] += 1
                    for i in active:  # the step wrote each active slot's newest token into its cache
                        length[i] += 1
                    chosen_tokens = self._choose(logits, slots[:rows])
                    stats["decode_s"] += time.perf_counter() - began
                    for slot, token in enumerate(chosen_tokens):
                        if slots[slot] is not None:
                            finished = emit(slot, token)
                            if finished:
                                yield finished
        finally:
            self.k = self.v = None
            self._graphs = {}
            if self.m.device.type == "cuda":
                torch.cuda.empty_cache()

    def generate(self, requests: Sequence[Request],
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New tokens for every request, in request order."""
        out: list[list[int] | None] = [None] * len(requests)
        for index, tokens in self.run(requests, on_token):
            out[index] = tokens
        return out  # type: ignore[return-value]


def _sample(logits, sampling: Sampling):
    import torch

    logits = logits / max(sampling.temperature, 1e-6)
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop = (cumulative - ordered.softmax(-1)) > sampling.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1)[:, 0]
