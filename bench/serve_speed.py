"""Serving throughput: requests/s and latency of predict.py --serve at 1, 16 and 64 concurrent clients.

    # one GPU, the Baichuan-7B shape with random weights (needs the MSRA corpus and Baichuan's
    # tokenizer.model, see --help); merged bf16 = what --adapter_mode auto serves on an H200
    python bench/serve_speed.py --json $OUT/serve_7b.json
    python bench/serve_speed.py --form nf4+lora --json $OUT/serve_7b_nf4.json
    python bench/serve_speed.py --tiny          # anywhere, in seconds

The server is the real one (cnqlora.serving on uvicorn, loopback); the clients run in a separate
process (this script with --client: threads with keep-alive HTTP connections, standard library
only), so their Python does not compete with the server's for one interpreter. Every request is
a chat completion of one MSRA test sentence (system = the NER instruction, user = 文本：sentence:
the file-mode prompt), with max_tokens = its reference answer's length + 1 and no stop token (random
weights would stop anywhere), so each answer has a known length, as in predict_speed's
"reference" workload. Each level sends `--requests_per_client` requests per client (at most the
test set); latency is per request, from sending it to the last byte of the answer.

"file mode" is the same requests through the engine directly (Engine.generate, as predict.py
--data_file runs them, --file_slots slots; the faster of two runs): the throughput the server is
measured against. The server levels follow a warm-up of --slots requests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- the client process (stdlib only)


def client_main(args) -> int:
    """Send the requests of a --requests file from --concurrency threads; print latencies as JSON."""
    import http.client
    import threading
    from urllib.parse import urlparse

    with open(args.requests, encoding="utf-8") as f:
        bodies = [json.dumps(b).encode() for b in json.load(f)]
    url = urlparse(args.client)
    lock = threading.Lock()
    results: list[dict[str, Any] | None] = [None] * len(bodies)
    state = {"next": 0}

    def worker() -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(bodies):
                break
            began = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body=bodies[i],
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                status = response.status
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
                status, payload = 0, {"error": {"message": f"{type(e).__name__}: {e}"}}
            seconds = time.perf_counter() - began
            tokens = payload.get("usage", {}).get("completion_tokens") if status == 200 else None
            results[i] = {"status": status, "seconds": seconds, "completion_tokens": tokens,
                          "error": None if status == 200 else payload.get("error", {}).get("message")}
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"wall_s": time.perf_counter() - began, "results": results}))
    return 0


# --------------------------------------------------------------------------- the server side


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_clients(url: str, bodies: list[dict], concurrency: int, workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, f"requests_c{concurrency}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(bodies, f, ensure_ascii=False)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", url, "--concurrency",
                           str(concurrency), "--requests", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def summarise(out: dict[str, Any], bodies: list[dict]) -> dict[str, Any]:
    results = out["results"]
    ok = [r for r in results if r["status"] == 200]
    wrong = sum(1 for r, b in zip(results, bodies) if r["status"] == 200 and r["completion_tokens"] != b["max_tokens"])
    latencies = [r["seconds"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    errors = [r["error"] for r in results if r["status"] != 200]
    return {"requests": len(results), "ok": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wrong_length": wrong, "wall_s": out["wall_s"], "requests_per_s": len(ok) / out["wall_s"],
            "new_tokens_per_s": tokens / out["wall_s"],
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p99_s": percentile(latencies, 99) if latencies else None,
            "mean_s": sum(latencies) / len(latencies) if latencies else None}


def file_mode(model, tokenizer, prompts: list[list[int]], targets: list[int], slots: int) -> dict[str, Any]:
    """The same requests through Engine.generate (predict.py --data_file's path), no stop token."""
    from bench import common
    from cnqlora.engine import Engine, Request

    engine = Engine(model, [], tokenizer.pad_token_id, max_batch=slots, kv_memory_fraction=0.8)
    engine.generate([Request(prompts[0], 2)])  # warm-up
    device = str(model.device.type)
    seconds = float("inf")
    for _ in range(2):  # the faster of two: the first also pays for one-off costs (graph captures, allocations)
        common.sync(device)
        began = time.perf_counter()
        out = engine.generate([Request(p, t) for p, t in zip(prompts, targets)])
        common.sync(device)
        seconds = min(seconds, time.perf_counter() - began)
    assert [len(o) for o in out] == list(targets), "the engine did not make the forced lengths"
    return {"sentences": len(prompts), "seconds": seconds, "sentences_per_s": len(prompts) / seconds,
            "new_tokens_per_s": sum(targets) / seconds, "slots": engine.last_stats.get("slots")}


def server_main(args) -> int:
    import tempfile

    from bench import common
    from bench.common import fmt, log
    from cnqlora.data import encode_prompt
    from cnqlora.generation import GenerationArgs
    from cnqlora.inference import Loaded, PredictArgs
    from cnqlora.models import resolve_dtype
    from cnqlora.serving import ServeArgs, ServerThread, Service

    phases, budget, device, report = common.begin(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="cnqlora-serve-bench-")
    os.makedirs(workdir, exist_ok=True)
    args.workdir = workdir
    with phases("data"):
        corpus, tokenizer_path, train_sentences = common.resolve_inputs(args)
        tokenizer = common.load_tokenizer(tokenizer_path)
        _, test = common.load_sentences(corpus, train_sentences)
        records = common.to_records(test)
        most = max(args.concurrency) * args.requests_per_client
        records = records[:most]
        prompts = [encode_prompt(tokenizer, "baichuan", r["instruct"], r["query"]).ids for r in records]
        targets = [len(tokenizer.encode(r["answer"], add_special_tokens=False)) + 1 for r in records]
        bodies = [{"messages": [{"role": "system", "content": r["instruct"]}, {"role": "user", "content": r["query"]}],
                   "max_tokens": t} for r, t in zip(records, targets)]
        max_context = max(len(p) + t for p, t in zip(prompts, targets))
        log(f"{len(records)} test sentences; prompts mean {sum(map(len, prompts)) / len(prompts):.1f} tokens; answers "
            f"{min(targets)}-{max(targets)} tokens, mean {sum(targets) / len(targets):.1f}")
    dtype = resolve_dtype("auto", device)
    with phases("build"):
        model = common.build_generation_model(args.tiny, len(tokenizer), device, args.seed, dtype)
        if args.form == "merged":
            common.dequantize_model(model, dtype)
            common.free_memory(device)
        else:
            from cnqlora.models import LoraArgs, attach_lora

            model, _ = attach_lora(model, LoraArgs(lora_r=8))  # the training default: all-linear, r=8
            model.eval()
    results: dict[str, Any] = {}
    report.update(form=args.form, levels=results)
    with phases("file mode"):
        report["file_mode"] = file_mode(model, tokenizer, prompts, targets, args.file_slots)
        log(f"file mode: {report['file_mode']['sentences_per_s']:.1f} sentences/s")
    loaded = Loaded(model, tokenizer, "baichuan", f"random {args.form}", 0.0, device)
    service = Service(loaded, PredictArgs(), GenerationArgs(batch_size=args.slots),
                      ServeArgs(max_context=max_context, max_tokens_limit=max(targets), max_queue=max(len(bodies), 1),
                                max_body_bytes=1 << 20), stop_ids=[])
    running = ServerThread(service, drain_timeout=10)
    try:
        with phases("warm-up"):
            run_clients(running.url, bodies[:min(len(bodies), args.slots)], min(len(bodies), args.slots), workdir)
        for clients in args.concurrency:
            name = f"{clients} clients"
            n = min(len(bodies), clients * args.requests_per_client)
            if not budget.allows(5.0, name):
                continue
            with phases(name):
                r = summarise(run_clients(running.url, bodies[:n], clients, workdir), bodies[:n])
            r.update(clients=clients, slots=service.engine.last_stats.get("slots"))
            results[name] = r
            log(f"{name}: {r['ok']}/{r['requests']} ok, {r['requests_per_s']:.2f} requests/s, p50 "
                f"{fmt(r['p50_s'], 3)} s, p99 {fmt(r['p99_s'], 3)} s, {r['new_tokens_per_s']:,.0f} new tokens/s")
    finally:
        running.stop()
    report["elapsed_s"] = common.elapsed()
    common.write_json(args.json, report)
    file_rate = report["file_mode"]["sentences_per_s"]
    rows = [["file mode (Engine.generate)", report["file_mode"]["slots"], report["file_mode"]["sentences"],
             fmt(file_rate, 2), "n/a", "n/a", fmt(report["file_mode"]["new_tokens_per_s"], 0), "1.00", "ok"]]
    for name, r in results.items():
        status = "ok" if not r["errors"] and not r["wrong_length"] else \
            f"error: {r['errors']} failed, {r['wrong_length']} wrong length ({r['first_error']})"
        rows.append([f"server, {name}", r["slots"], r["requests"], fmt(r["requests_per_s"], 2), fmt(r["p50_s"], 3),
                     fmt(r["p99_s"], 3), fmt(r["new_tokens_per_s"], 0), fmt(r["requests_per_s"] / file_rate, 2),
                     status])
    print("\n" + common.markdown_table(["path", "slots", "requests", "requests/s", "p50 s", "p99 s", "new tok/s",
                                 "vs file mode", "status"], rows))
    bad = any(r["errors"] or r["wrong_length"] for r in results.values())
    return 1 if bad or not results else 0


def parse_args(argv):
    from bench import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", choices=("merged", "nf4+lora"), default="merged",
                        help="the served model: merged bf16 (what --adapter_mode auto serves on a big GPU) or the "
                             "NF4 base + LoRA r=8")
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests_per_client", type=int, default=None,
                        help="requests per client at each level (default 16; --tiny 2), at most the test set")
    parser.add_argument("--slots", type=int, default=64, help="the server's KV-cache slots (--batch_size)")
    parser.add_argument("--file_slots", type=int, default=256, help="file mode's KV-cache slots")
    common.add_common_args(parser, time_budget=540.0)
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency needs at least one level, each at least 1")
    args.requests_per_client = args.requests_per_client or (2 if args.tiny else 16)
    if args.tiny:
        args.slots = min(args.slots, 8)
        args.file_slots = min(args.file_slots, 16)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--client" in argv:  # the client process: no torch, no model
        parser = argparse.ArgumentParser()
        parser.add_argument("--client", required=True)
        parser.add_argument("--concurrency", type=int, required=True)
        parser.add_argument("--requests", required=True)
        return client_main(parser.parse_args(argv))
    return server_main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
