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

The chosen tokens stay on the device: the next step is launched before the host reads the
last one, so the GPU never waits for Python to look at a token (a row that ended is noticed one
step late and that step's token for it is dropped). The first tokens that all prompts of a run
share (a task's template and instruction) are prefilled once. A small model's prefill and decode
steps are replayed from CUDA graphs, since launching their many small kernels one by one costs
more than running them. Grounded rows decode like plain ones; a token their constraint refuses
sends the row back one step, decoded then with the mask (`_masked`, `rewind` in `run`).

Greedy answers equal `model.generate`'s token for token (tests/test_engine.py): each row attends
only to its own cache slot, so its answer does not depend on what else is being decoded.
Requests come as a list, or as a `Feed` that a server fills while the engine runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "baichuan")


@dataclass
class Sampling:
    """Greedy when do_sample is off; else temperature, then top-k, then top-p (as in generate)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Request:
    """One prompt to answer.

    `constraint` (e.g. grounded.GroundedAnswer) limits the tokens allowed; `sampling` replaces the
    engine's for this request, and `seed` gives it a generator of its own, so that what it samples
    does not depend on what else runs. Setting `cancelled` (from any thread) frees its slot at the
    next step; the engine then reports it with the tokens it had.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    constraint: Any = None
    sampling: Sampling | None = None
    seed: int | None = None
    cancelled: bool = False


class Feed:
    """Requests that arrive while the engine runs (a server's queue); `run` ends once it is closed and empty."""

    def __init__(self, max_waiting: int | None = None) -> None:
        self._waiting: deque[tuple[int, Request]] = deque()
        self._ready = threading.Condition()
        self._next = 0
        self._closed = False
        self.max_waiting = max_waiting

    def put(self, request: Request) -> int:
        """Queue a request; its index is what `run` reports it under. Raises `Full` or `Closed`."""
        _check(request)
        with self._ready:
            if self._closed:
                raise Closed("the engine is shutting down")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise Full(f"{len(self._waiting)} requests are already waiting")
            index = self._next
            self._next += 1
            self._waiting.append((index, request))
            self._ready.notify()
        return index

    def waiting(self) -> int:
        with self._ready:
            return len(self._waiting)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take(self, block: bool) -> tuple[list[tuple[int, Request]], bool]:
        """What has arrived (waiting for something when `block`), and whether the feed is closed."""
        with self._ready:
            while block and not self._waiting and not self._closed:
                self._ready.wait()
            taken = list(self._waiting)
            self._waiting.clear()
            return taken, self._closed


class Full(RuntimeError):
    """The feed's queue is at its limit."""


class Closed(RuntimeError):
    """The feed takes no more requests."""


def _check(request: Request) -> None:
    if request.max_new_tokens < 1 or not len(request.prompt):
        raise ValueError("every request needs a prompt and max_new_tokens >= 1")


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
        self.hidden_size = config.hidden_size
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

    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None:
        # With a mask, no fused SDPA kernel takes grouped-query attention, and the math fallback
        # copies every key and value once per query head (on the Qwen-0.5B shape ~8 GB a decode
        # step). The `groups` query heads that share a key head are instead stacked as that
        # head's query rows (HF's order: query head h reads key head h // groups), so one masked
        # kernel reads each key once.
        batch, heads, length, dim = q.shape
        stacked = q.reshape(batch, k.shape[1], groups * length, dim)
        if length > 1:
            mask = mask.repeat(*([1] * (mask.dim() - 2)), groups, 1)
        out = F.scaled_dot_product_attention(stacked, k, v, attn_mask=mask, scale=scale)
        return out.reshape(batch, heads, length, dim)
    if groups > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass
class _Slot:
    index: int  # the request's index: its position in the list given to run(), or the feed's number
    request: Request
    issued: int = 1  # tokens asked of the device so far (the prefill makes the first)
    tokens: list[int] = field(default_factory=list)
    generator: Any = None
    gen: int = 0  # bumped when the slot is rewound: tokens of steps launched before are stale
    force_mask: bool = False  # its next token is chosen among the allowed ones (after a rejected one)

    @property
    def position(self) -> int:
        """Where the next decode step writes: the prompt and every issued token but the newest are in the cache."""
        return len(self.request.prompt) + self.issued - 1


@dataclass
class _Launched:
    """A step on the device whose tokens the host has not read yet."""

    host: Any  # the step's tokens, copied to host memory when the device gets there
    ready: Any  # a CUDA event (None on the CPU, where the copy is done when launched)
    rows: list[tuple[int, int, _Slot, int]]  # (row of `host`, slot, the slot's request then, its gen then)
    kind: str
    timing: tuple[Any, Any] | None = None


class Engine:
    """Decodes many requests through `slots` cache slots; see the module docstring."""

    def __init__(self, model, stop_ids: Sequence[int], pad_id: int, *, max_batch: int = 256,
                 prefill_tokens: int = 16384, kv_memory_fraction: float = 0.5, kv_max_gib: float | None = None,
                 sampling: Sampling | None = None, length_step: int = 64, cuda_graphs: bool = True,
                 shared_prefix_min: int = 16, prefill_graphs: bool | None = None) -> None:
        reason = supported(model)
        if reason:
            raise ValueError(f"the generation engine cannot run this model: {reason}")
        self.m = _Model(model)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        # A refused greedy token is replaced by the best permitted one among the row's top 32
        # tokens, else its top 4,096; only when none of those is permitted does the row get the
        # full mask, whose listing of allowed tokens (for a grounded answer: the vocabulary's
        # token trie) cost a third of a second of Qwen-0.5B's 3.5 s MSRA test run.
        self.rewind_candidates: tuple[int, ...] = (32, 4096)
        # Steps that are not greedy come from refused tokens (a dozen in a grounded file run)
        # unless rows sample; a graph capture costs ~0.1 s, so such steps run eagerly at first.
        self.eager_before_graph = 8
        self.kv_memory_fraction = kv_memory_fraction
        self.kv_max_gib = kv_max_gib
        self.sampling = sampling or Sampling()
        self.length_step = length_step
        self.cuda_graphs = cuda_graphs and self.m.device.type == "cuda"
        # Prompts of one task share their template and instruction (MSRA's: 59 of 92 tokens on
        # average); a prefix at least this long is computed once per run (0: never).
        self.shared_prefix_min = shared_prefix_min
        # A small model's prefill is launch-bound (Qwen-0.5B shape on an H200: ~70 ms of host time
        # per call for ~10 ms of GPU work), so it is replayed from graphs of fixed shapes; a 7B
        # model's is compute-bound, and padding rows to a graph's width would cost more than the
        # launches. None: graphs for models up to 2,048 wide when CUDA graphs are on. On the CPU,
        # True runs the fixed-shape path eagerly (how the tests check it).
        if prefill_graphs is None:
            prefill_graphs = self.cuda_graphs and self.m.hidden_size <= 2048
        self.prefill_graphs = prefill_graphs
        self._prefix_len = 0
        self.last_stats: dict[str, Any] = {}
        self.k = self.v = None

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

    def _prefill_prefix(self, prefix: Sequence[int]) -> None:
        """The keys and values of the prompts' shared first tokens, computed once for the whole run."""
        import torch

        ids = self._to_device([list(prefix)])
        positions = torch.arange(len(prefix), device=self.m.device)[None]
        self._pk, self._pv = [None] * len(self.m.layers), [None] * len(self.m.layers)

        def write(i, k, v):
            self._pk[i], self._pv[i] = k, v

        self._forward(ids, positions, write, lambda i, q, k, v: _attention(q, k, v, causal=True, scale=self.m.scaling))

    def _prefill(self, slots: list[int], prompts: list[Sequence[int]]):
        """Run the prompts (right padded) into their slots; return the logits of each last token.

        With a shared prefix in the cache (`_prefix_len` tokens), only the rest of each prompt is
        computed: its queries attend to the prefix's stored keys and causally to their own.
        """
        start = self._prefix_len
        rest = [p[start:] for p in prompts]
        width = max(len(r) for r in rest)
        ids = self._to_device([list(r) + [self.pad_id] * (width - len(r)) for r in rest])
        return self._prefill_pass(ids, self._to_device(slots), self._to_device([len(r) - 1 for r in rest]))

    def _prefill_pass(self, ids, index, last):
        """_prefill on device tensors: `ids` [rows, width] (suffixes after the shared prefix), their
        slots and the position of each row's last token in `ids`."""
        import torch

        start = self._prefix_len
        device = self.m.device
        rows, width = ids.shape
        positions = torch.arange(start, start + width, device=device).expand(rows, width)
        if start:
            # query t sees every prefix key and the row's own keys up to t
            mask = (torch.arange(start + width, device=device)[None, :]
                    <= torch.arange(start, start + width, device=device)[:, None])

        def write(i, k, v):
            if start:
                self.k[i][index, :, :start] = self._pk[i]
                self.v[i][index, :, :start] = self._pv[i]
            self.k[i][index, :, start:start + width] = k
            self.v[i][index, :, start:start + width] = v

        def attend(i, q, k, v):
            # Right padding: causal attention alone keeps every real token from seeing the padding.
            if not start:
                return _attention(q, k, v, causal=True, scale=self.m.scaling)
            keys = torch.cat([self._pk[i].expand(rows, -1, -1, -1), k], dim=2)
            values = torch.cat([self._pv[i].expand(rows, -1, -1, -1), v], dim=2)
            return _attention(q, keys, values, mask=mask, scale=self.m.scaling)

        hidden = self._forward(ids, positions, write, attend)
        logits = self.m.head(hidden[torch.arange(rows, device=device), last])
        self._vocab = logits.shape[-1]
        return logits

    PREFILL_WIDTHS = (32, 64, 128, 256, 512)
    PREFILL_ROWS = (16, 64, 256)

    def _prefill_shape(self, width: int, rows: int | None = None) -> tuple[int, int] | None:
        """(rows, width) of the smallest fixed-shape prefill that takes `rows` suffixes (default:
        as many as fit) of up to `width` tokens; None when none does (the prefill then runs eagerly)."""
        for w in self.PREFILL_WIDTHS:
            if width <= w:
                if self._prefix_len + w > self._max_len:  # past the cache's end
                    return None
                most = max(1, min(self._n_slots, self.prefill_tokens // w))
                for r in self.PREFILL_ROWS:
                    if r >= most or (rows is not None and r >= rows):
                        return min(r, most), w
                return most, w
        return None

    def _prefill_fixed(self, slots: list[int], prompts: list[Sequence[int]], shape: tuple[int, int]):
        """_prefill padded to `shape` (rows to the scratch slot), argmax and state update included,
        replayed from a CUDA graph per shape when graphs are on; returns each row's first token."""
        import torch

        rows, width = shape
        start = self._prefix_len
        rest = [list(p[start:]) for p in prompts]
        pad = rows - len(rest)
        ids = [r + [self.pad_id] * (width - len(r)) for r in rest] + [[self.pad_id] * width] * pad
        lens = [len(p) for p in prompts] + [0] * pad
        buffers = self._fixed.get(shape)
        if buffers is None:
            device = self.m.device
            buffers = {"ids": torch.full(shape, self.pad_id, dtype=torch.long, device=device),
                       "index": torch.full((rows,), self._scratch, dtype=torch.long, device=device),
                       "last": torch.zeros(rows, dtype=torch.long, device=device),
                       "lens": torch.zeros(rows, dtype=torch.long, device=device)}
            self._fixed[shape] = buffers
        self._fill(buffers["ids"], ids)
        self._fill(buffers["index"], slots + [self._scratch] * pad)
        self._fill(buffers["last"], [len(r) - 1 for r in rest] + [0] * pad)
        self._fill(buffers["lens"], lens)

        def run():
            logits = self._prefill_pass(buffers["ids"], buffers["index"], buffers["last"])
            tokens = logits.argmax(dim=-1)
            self._tok[buffers["index"]] = tokens
            self._pos[buffers["index"]] = buffers["lens"]
            return tokens

        if not self.cuda_graphs:
            return run()[:len(prompts)]
        graph = self._graphs.get(("prefill", shape))
        if graph is None:
            try:
                graph = self._graphs[("prefill", shape)] = self._capture("prefill", run)
            except RuntimeError as e:  # a layer that cannot be captured: prefill eagerly from now on
                self.prefill_graphs = False
                self._stats["prefill_graphs"] = f"off: {type(e).__name__}: {str(e)[:200]}"
                return run()[:len(prompts)]
        graph[0].replay()
        return graph[1][:len(prompts)]

    def _decode(self, tokens, positions, span: int):
        """One token for every slot, each at its own position, attending to its first `span` keys."""
        import torch

        rows = len(tokens)
        arange = torch.arange(rows, device=self.m.device)
        mask = (torch.arange(span, device=self.m.device)[None, :] <= positions[:, None])[:, None, None, :]

        def write(i, k, v):
            self.k[i][arange, :, positions] = k[:, :, 0]
            self.v[i][arange, :, positions] = v[:, :, 0]

        def attend(i, q, k, v):
            return _attention(q, self.k[i][:, :, :span], self.v[i][:, :, :span], mask=mask, scale=self.m.scaling)

        hidden = self._forward(tokens[:, None], positions[:, None], write, attend)
        return self.m.head(hidden[:, 0])

    def _step(self, span: int, greedy: bool):
        """A decode step over the device-side state: active slots read their last token and position.

        Idle slots decode a pad at position 0: harmless, their cache is rewritten by their next
        prefill, and it keeps every step one batch of fixed layout (what a CUDA graph needs).
        With `greedy`, the argmax and the state update are part of the step, so the graph of a
        plain greedy step holds everything and the host only launches it.
        """
        import torch

        active = self._active
        positions = torch.where(active, self._pos, 0)
        logits = self._decode(torch.where(active, self._tok, self.pad_id), positions, span)
        self._pos.add_(active.long())
        if greedy:
            self._tok.copy_(torch.where(active, logits.argmax(dim=-1), self._tok))
        return logits

    def _step_graphed(self, span: int, greedy: bool):
        """_step, replayed from a CUDA graph per (span, greedy).

        A decode step of a small model is hundreds of short kernels; launched one by one from
        Python they take longer than they run.
        """
        key = (span, greedy)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture("decode", lambda: self._step(span, greedy))
        graph[0].replay()
        return graph[1]

    def _capture(self, kind: str, step: Callable[[], Any]) -> tuple[Any, Any]:
        """A CUDA graph of `step` (which updates the slot state) and its output.

        The first graph of each kind in a run is preceded by a warm-up pass on a side stream, as
        CUDA graphs require (lazy initialisation must not happen inside a capture); its effect on
        the slot state is undone. Later shapes of the kind skip it: on a launch-bound model each
        pass costs as much as the step itself, and captures were a third of a 0.5B run.
        """
        import torch

        began = time.perf_counter()
        if kind not in self._warmed:
            saved = self._tok.clone(), self._pos.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            self._tok.copy_(saved[0])
            self._pos.copy_(saved[1])
            self._warmed.add(kind)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()  # recorded, not run: the replay that follows runs it
        self._stats["graph_captures"] += 1
        self._stats["capture_s"] += time.perf_counter() - began
        return graph, out

    def _launch_step(self, span: int, greedy: bool):
        """A decode step, from its CUDA graph when graphs are on (and can be captured)."""
        graphed = self.cuda_graphs
        if graphed and not greedy:
            uses = self._eager_uses[span] = self._eager_uses.get(span, 0) + 1
            graphed = uses > self.eager_before_graph
        if graphed:
            try:
                return self._step_graphed(span, greedy)
            except RuntimeError as e:  # a layer that cannot be captured: decode eagerly from now on
                self.cuda_graphs = False
                self._stats["cuda_graphs"] = f"off: {type(e).__name__}: {str(e)[:200]}"
                self._graphs = {}
        return self._step(span, greedy)

    # ------------------------------------------------------------------ choosing tokens

    def _choose(self, logits, rows: list[_Slot | None]):
        """The next token of each row, on the device (rows that are None get the argmax, unused)."""
        import torch

        constrained = [(row, s) for row, s in enumerate(rows) if s is not None and self._masked(s)]
        picked: dict[int, int] = {}
        if constrained:
            logits = logits.float()
            vocab = logits.shape[-1]
            picked = self._pick_permitted(logits, constrained, vocab)
            constrained = [(row, s) for row, s in constrained if row not in picked]
        if constrained:
            self._stats["masked_rows"] += len(constrained)
            r, c = [], []
            for row, s in constrained:
                allowed = s.request.constraint.allowed(len(s.tokens), vocab)
                r.append(torch.full((len(allowed),), row, dtype=torch.long))
                c.append(allowed)
            r = torch.cat(r).to(logits.device)
            c = torch.cat(c).to(logits.device)
            keep = self._to_device([row for row, _ in constrained])
            masked = torch.full_like(logits[keep], float("-inf"))
            lookup = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
            lookup[keep] = torch.arange(len(constrained), device=logits.device)
            masked[lookup[r], c] = logits[r, c]
            logits[keep] = masked
        chosen = logits.argmax(dim=-1)
        if picked:
            chosen[self._to_device(list(picked))] = self._to_device(list(picked.values()))
        sampled: dict[tuple, list[int]] = {}
        for row, s in enumerate(rows):
            if s is None:
                continue
            sampling = s.request.sampling or self.sampling
            if not sampling.do_sample:
                continue
            if s.generator is not None:  # a seed of its own: drawn alone, from its own generator
                chosen[row] = _sample(logits[row:row + 1].float(), sampling, s.generator)[0]
            else:
                sampled.setdefault((sampling.temperature, sampling.top_k, sampling.top_p), []).append(row)
        for (temperature, top_k, top_p), group in sampled.items():
            index = self._to_device(group)
            chosen[index] = _sample(logits[index].float(), Sampling(True, temperature, top_k, top_p))
        return chosen

    def _pick_permitted(self, logits, constrained: list[tuple[int, _Slot]], vocab: int) -> dict[int, int]:
        """For greedy rows whose constraint checks single tokens: the masked argmax found among
        the row's top tokens, without listing every allowed token (for a grounded answer that
        would build the text's automaton and the vocabulary's token trie: most of a second for
        Qwen's 150k tokens, on the first refusal of a run). Rows where the top tokens cannot
        decide (none permitted, or a tie running past them) are left out: they get the mask."""
        rows = [(row, s) for row, s in constrained
                if hasattr(s.request.constraint, "permits") and not (s.request.sampling or self.sampling).do_sample]
        picked: dict[int, int] = {}
        for k in self.rewind_candidates:  # widening: rows the first tier cannot decide try the next
            k = min(k, vocab)
            if not rows or k <= 0:
                continue
            values, ids = logits[self._to_device([row for row, _ in rows])].topk(k, dim=-1)
            undecided = []
            for (row, s), row_values, row_ids in zip(rows, values.tolist(), ids.tolist()):
                permits, generated = s.request.constraint.permits, len(s.tokens)
                best: tuple[float, int] | None = None
                for value, token in zip(row_values, row_ids):
                    if best is not None and value < best[0]:
                        break
                    # argmax takes the lowest id among equal maxima; topk's order among ties is not fixed
                    if (best is None or token < best[1]) and permits(token, generated, vocab):
                        best = (value, token)
                if best is not None and not (row_values[-1] == best[0] and k < vocab):
                    picked[row] = best[1]
                else:
                    undecided.append((row, s))
            rows = undecided
        return picked

    def _masked(self, s: _Slot) -> bool:
        """Whether the row's next token is chosen among its constraint's allowed ones.

        Greedy rows with a constraint that can check a single token (`permits`) are decoded like
        plain ones and checked when read: the argmax, when allowed, is the masked argmax too.
        """
        c = s.request.constraint
        return c is not None and (s.force_mask or (s.request.sampling or self.sampling).do_sample
                                  or not hasattr(c, "permits"))

    def _plain(self, s: _Slot) -> bool:
        return not self._masked(s) and not (s.request.sampling or self.sampling).do_sample

    # ------------------------------------------------------------------ host <-> device

    def _to_device(self, values: list[int]):
        import torch

        host = torch.tensor(values, dtype=torch.long, pin_memory=self.m.device.type == "cuda")
        return host.to(self.m.device, non_blocking=True)

    def _fill(self, buffer, values: list) -> None:
        """Copy `values` into a device tensor that must keep its address (a graph's input)."""
        import torch

        host = torch.tensor(values, dtype=buffer.dtype, pin_memory=self.m.device.type == "cuda")
        buffer.copy_(host, non_blocking=True)

    def _launch_read(self, tokens, rows: list[tuple[int, int, _Slot]], kind: str, timing) -> _Launched:
        """Queue the copy of `tokens` to the host; the step is read later, by _read."""
        import torch

        if self.m.device.type != "cuda":
            return _Launched(tokens.tolist(), None, rows, kind)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        if timing is not None:  # before `ready`: done once the host has waited for `ready`
            timing[1].record()
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(host, ready, rows, kind, timing)

    def _timing(self):
        import torch

        if self.m.device.type != "cuda":
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    # ------------------------------------------------------------------ the loop

    def run(self, requests: Sequence[Request] | Feed,
            on_token: Callable[[int, int], None] | None = None, *,
            max_len: int | None = None) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, new tokens without the stop token) as each request finishes.

        `on_token(index, token)` sees every token as it is chosen (streaming). The cache is
        allocated for these requests and freed when the last one is done. With a Feed, `max_len`
        (prompt plus answer tokens) sizes the cache and longer requests are refused.
        """
        import torch

        feed = requests if isinstance(requests, Feed) else None
        if feed is None:
            if not requests:
                return
            for r in requests:
                _check(r)
            max_len = _round_up(max(len(r.prompt) + r.max_new_tokens for r in requests), self.length_step)
            known = dict(enumerate(requests))
            # Longest prompts first: they are the ones whose padding would cost most if mixed, and a
            # long answer started late is what makes the tail of a run.
            queue = deque(sorted(known, key=lambda i: -len(known[i].prompt)))
            wanted = len(requests)
        else:
            if max_len is None:
                raise ValueError("run() on a Feed needs max_len")
            max_len = _round_up(max_len, self.length_step)
            known, queue, wanted = {}, deque(), self.max_batch
        n_slots = self.plan_slots(wanted, max_len)
        device = self.m.device
        # One slot more than requests can take: the scratch slot, where the padding rows of a
        # fixed-shape prefill write (and which decode steps run idle).
        n_total = n_slots + 1
        self._n_slots, self._scratch, self._fixed, self._max_len = n_slots, n_slots, {}, max_len
        shape = (n_total, self.m.n_kv, max_len, self.m.head_dim)
        self.k = [torch.zeros(shape, dtype=self.m.dtype, device=device) for _ in self.m.layers]
        self.v = [torch.zeros(shape, dtype=self.m.dtype, device=device) for _ in self.m.layers]
        # the device-side state a decode step reads and advances
        self._tok = torch.full((n_total,), self.pad_id, dtype=torch.long, device=device)
        self._pos = torch.zeros(n_total, dtype=torch.long, device=device)
        self._active = torch.zeros(n_total, dtype=torch.bool, device=device)
        slots: list[_Slot | None] = [None] * n_slots
        launched: deque[_Launched] = deque()
        rewinds: list[tuple[int, _Slot, int, int]] = []  # (slot, its request, input token, position)
        prefix = _shared_prefix([r.prompt for r in requests]) if feed is None else []
        if not self.shared_prefix_min or len(prefix) < self.shared_prefix_min:
            prefix = []
        self._prefix_len = len(prefix)
        stats = self._stats = {"slots": n_slots, "max_len": max_len, "prefill_calls": 0, "decode_steps": 0,
                               "shared_prefix": len(prefix),
                               "kv_gib": n_total * self._slot_bytes(max_len) / 2**30, "prefill_graph_calls": 0, "cuda_graphs": self.cuda_graphs,
                               "graph_captures": 0, "capture_s": 0.0, "rewinds": 0, "masked_rows": 0, "wait_s": 0.0, "prefill_gpu_s": 0.0,
                               "decode_gpu_s": 0.0, "wall_s": 0.0}
        self.last_stats = stats
        self._graphs: dict[Any, Any] = {}
        self._eager_uses: dict[int, int] = {}  # per span: steps that are not greedy so far
        self._warmed: set[str] = set()
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()
        began = time.perf_counter()

        def admit(index: int, request: Request, slot: int) -> None:
            s = _Slot(index, request)
            if request.seed is not None and (request.sampling or self.sampling).do_sample:
                s.generator = torch.Generator(device=device).manual_seed(int(request.seed))
            slots[slot] = s

        def finish(slot: int) -> tuple[int, list[int]]:
            s = slots[slot]
            slots[slot] = None
            return s.index, s.tokens

        def rewind(slot: int, s: _Slot) -> None:
            """Take back a token the constraint refuses: the slot re-decodes that step with the mask.

            The step launched after it (with the refused token as input) is dropped; its cache
            write lies past the position the slot goes back to, so it is overwritten.
            """
            k = len(s.tokens)
            s.gen += 1
            s.issued = k
            s.force_mask = True
            rewinds.append((slot, s, s.tokens[-1] if k else s.request.prompt[-1], s.position))
            stats["rewinds"] += 1

        def read(step: _Launched) -> Iterator[tuple[int, list[int]]]:
            if step.ready is not None:
                waited = time.perf_counter()
                step.ready.synchronize()
                stats["wait_s"] += time.perf_counter() - waited
                values = step.host.tolist()
                if step.timing is not None:
                    stats[f"{step.kind}_gpu_s"] += step.timing[0].elapsed_time(step.timing[1]) / 1000
            else:
                values = step.host
            for row, slot, s, gen in step.rows:
                if slots[slot] is not s or s.gen != gen:  # ended, cancelled or rewound since (one step late)
                    continue
                token = values[row]
                c = s.request.constraint
                if c is not None and hasattr(c, "permits") and not c.permits(token, len(s.tokens), self._vocab):
                    rewind(slot, s)
                    continue
                if token in self.stop_ids:
                    yield finish(slot)
                    continue
                s.tokens.append(token)
                if s.request.constraint is not None:
                    s.request.constraint.advance(token)
                if on_token is not None:
                    on_token(s.index, token)
                if len(s.tokens) >= s.request.max_new_tokens:
                    yield finish(slot)

        def drain(keep: int) -> Iterator[tuple[int, list[int]]]:
            while len(launched) > keep:
                yield from read(launched.popleft())

        try:
            with torch.inference_mode():
                if prefix:
                    self._prefill_prefix(prefix)
                closed = feed is None
                while True:
                    if feed is not None and not closed:
                        idle = not queue and not launched and all(s is None for s in slots)
                        arrived, closed = feed.take(block=idle)
                        for index, request in arrived:
                            if len(request.prompt) + request.max_new_tokens > max_len:
                                request.cancelled = True  # too long for this cache: reported with no tokens
                                yield index, []
                                continue
                            known[index] = request
                            queue.append(index)
                    for slot, s in enumerate(slots):
                        if s is not None and s.request.cancelled:
                            yield finish(slot)
                    while queue and known[queue[0]].cancelled:
                        index = queue.popleft()
                        yield index, []
                        del known[index]
                    busy = [i for i, s in enumerate(slots) if s is not None]
                    if not busy and not queue and not launched:
                        if closed:
                            break
                        continue
                    free = [i for i, s in enumerate(slots) if s is None]
                    # Refill when enough slots are free to make a worthwhile prefill batch (or at the end).
                    if free and queue and (len(free) >= min(len(queue), max(1, n_slots // 8)) or not busy):
                        chosen: list[int] = []
                        width = 0  # the batch is padded to its longest prompt
                        while queue and len(chosen) < len(free):
                            wider = max(width, len(known[queue[0]].prompt) - self._prefix_len)
                            shape = self._prefill_shape(wider) if self.prefill_graphs else None
                            fits = shape[0] if shape else self.prefill_tokens // wider
                            if chosen and len(chosen) + 1 > fits:
                                break
                            chosen.append(queue.popleft())
                            width = wider
                        targets = free[:len(chosen)]
                        for slot, index in zip(targets, chosen):
                            admit(index, known.pop(index), slot)
                        prompts = [slots[t].request.prompt for t in targets]
                        shape = self._prefill_shape(width, len(targets)) if self.prefill_graphs else None
                        timing = self._timing()
                        with torch.profiler.record_function("engine.prefill"):
                            if shape and all(self._plain(slots[t]) for t in targets):
                                tokens = self._prefill_fixed(targets, prompts, shape)
                                stats["prefill_graph_calls"] += 1
                            else:
                                logits = self._prefill(targets, prompts)
                                tokens = self._choose(logits, [slots[t] for t in targets])
                                index = self._to_device(targets)
                                self._tok[index] = tokens
                                self._pos[index] = self._to_device([slots[t].position for t in targets])
                        stats["prefill_calls"] += 1
                        launched.append(self._launch_read(
                            tokens, [(row, t, slots[t], 0) for row, t in enumerate(targets)], "prefill", timing))
                        yield from drain(1)
                        continue
                    # the slots this step decodes: busy ones that still owe tokens
                    step_slots = [i for i in busy if slots[i].issued < slots[i].request.max_new_tokens]
                    if not step_slots:
                        yield from drain(0)
                        continue
                    greedy = all(self._plain(slots[i]) for i in step_slots)
                    live = [(slot, token, position) for slot, s, token, position in rewinds if slots[slot] is s]
                    rewinds.clear()
                    if live:
                        index = self._to_device([r[0] for r in live])
                        self._tok[index] = self._to_device([r[1] for r in live])
                        self._pos[index] = self._to_device([r[2] for r in live])
                    active = [False] * n_total
                    for i in step_slots:
                        active[i] = True
                    self._fill(self._active, active)
                    # A small model's step costs its launches, not its cache reads: one span, one graph.
                    span = max_len if self.prefill_graphs else min(
                        max_len, _round_up(max(slots[i].position for i in step_slots) + 1, self.length_step))
                    timing = self._timing()
                    with torch.profiler.record_function("engine.decode"):
                        logits = self._launch_step(span, greedy)
                    stats["decode_steps"] += 1
                    rows = [(i, i, slots[i], slots[i].gen) for i in step_slots]
                    for i in step_slots:
                        slots[i].issued += 1
                    if not greedy:
                        # the constraints and samplers need every token before this step's
                        yield from drain(0)
                        view: list[_Slot | None] = [None] * n_total
                        for _, i, s, gen in rows:  # None: ended or rewound at the step read last
                            view[i] = s if slots[i] is s and s.gen == gen else None
                        chosen_tokens = self._choose(logits, view)
                        for s in view:
                            if s is not None and s.force_mask:
                                s.force_mask = False
                        self._tok.copy_(torch.where(self._active, chosen_tokens, self._tok))
                        launched.append(self._launch_read(chosen_tokens, rows, "decode", timing))
                    else:
                        launched.append(self._launch_read(self._tok, rows, "decode", timing))
                    yield from drain(1)
        finally:
            stats["wall_s"] = time.perf_counter() - began
            self.k = self.v = None
            self._graphs = {}
            self._tok = self._pos = self._active = None
            self._pk = self._pv = None
            self._prefix_len = 0
            self._fixed = {}
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def generate(self, requests: Sequence[Request],
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New tokens for every request, in request order."""
        out: list[list[int] | None] = [None] * len(requests)
        for index, tokens in self.run(requests, on_token):
            out[index] = tokens
        return out  # type: ignore[return-value]


# What a run counts; accumulate_stats sums these over runs, the other stats are sizes.
_COUNTERS = frozenset(("prefill_calls", "decode_steps", "prefill_graph_calls", "graph_captures", "capture_s",
                       "rewinds", "masked_rows", "wait_s", "prefill_gpu_s", "decode_gpu_s", "wall_s"))


def accumulate_stats(total: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add a run's `last_stats` to `total`: counts and seconds summed, sizes (slots, cache) the last run's."""
    for key, value in stats.items():
        total[key] = total[key] + value if key in _COUNTERS and key in total else value


def _shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest first tokens all prompts share, leaving each at least one token of its own."""
    first = list(prompts[0])
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
        if not n:
            break
    return first[:max(n, 0)]


def _sample(logits, sampling: Sampling, generator=None):
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
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
