"""Structured-output benchmark: decode speed with a JSON Schema constraint vs without.

Builds the generated `small` model (about 25M parameters, random weights) unless `--model`
names a folder, then runs the same chat prompt through `MLXEngine`, greedy:

  (a) one stream, unconstrained, and one stream whose `response_format` is a JSON Schema
      (a typical object: strings, an enum, a bounded integer, an array of strings);
  (b) `--streams` concurrent streams, all unconstrained vs all constrained (aggregate).

It also reports the schema's compile time (building the llguidance matcher, cold, the
tokenizer already prepared) and the mean time of the grammar's logits processor per step,
which includes waiting for the token sampled last.

Each figure is the median of `--repeats` runs; the two sides run in back-to-back pairs and
each ratio is the median of the per-pair ratios, so drifting background load mostly
cancels. Target: constrained / unconstrained decode tok/s >= 0.9.

    .venv/bin/python bench/structured.py [--model DIR] [--tokens 128] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from dbloom.inference import (
    ChatMessage,
    Final,
    GenerateRequest,
    MLXEngine,
    ResponseFormat,
    build_tiny_model,
)
from dbloom.inference import _sampling as sampling

MODEL_ID = "bench-small"
PROMPT = "Write a short review of a book about peer-to-peer networks, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 120},
        "summary": {"type": "string", "maxLength": 4000},
        "genre": {"enum": ["fiction", "non-fiction", "poetry"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 8},
    },
    "required": ["title", "summary", "genre", "rating", "tags"],
    "additionalProperties": False,
}


@dataclass(frozen=True, slots=True)
class Run:
    """One stream: tokens, time to first token, decode time after it."""

    tokens: int
    ttft: float
    decode_seconds: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Batch:
    """Concurrent streams: total tokens over wall time."""

    tokens: int
    wall_seconds: float

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_seconds


class ProcessorClock:
    """Times every call of the grammar's logits processor (patched for the benchmark)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original = sampling.GrammarProcessor.__call__

    def install(self) -> None:
        original = self._original

        def timed(processor: Any, tokens: Any, logits: Any) -> Any:
            start = time.perf_counter()
            out = original(processor, tokens, logits)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        sampling.GrammarProcessor.__call__ = timed  # type: ignore[method-assign]

    @property
    def mean_ms(self) -> float:
        return self.seconds / self.calls * 1e3 if self.calls else 0.0


def request(tokens: int, constrained: bool, salt: int = 0) -> GenerateRequest:
    fmt = ResponseFormat(kind="json_schema", schema=json.dumps(SCHEMA)) if constrained else None
    return GenerateRequest(
        model=MODEL_ID,
        messages=(ChatMessage(role="user", content=f"{salt}. {PROMPT}"),),
        max_tokens=tokens,
        temperature=0.0,
        response_format=fmt,
    )


async def one(engine: MLXEngine, req: GenerateRequest) -> tuple[Run, float]:
    start = time.perf_counter()
    first = last = start
    count = 0
    async with engine.generate(req) as generation:
        async for item in generation:
            if isinstance(item, Final):
                break
            if item.token_ids:
                last = time.perf_counter()
                if count == 0:
                    first = last
                count += len(item.token_ids)
    return Run(count, first - start, last - first), last


async def batch(engine: MLXEngine, streams: int, tokens: int, constrained: bool) -> Batch:
    runs: list[tuple[Run, float]] = []

    async def go(i: int) -> None:
        runs.append(await one(engine, request(tokens, constrained, i)))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(go, i)
    end = max(finish for _, finish in runs)
    return Batch(tokens=sum(r.tokens for r, _ in runs), wall_seconds=end - start)


def compile_ms(engine: MLXEngine, repeats: int) -> float:
    """Median time to build a matcher for the schema (tokenizer prepared beforehand)."""
    grammars = engine._grammars
    req = request(8, constrained=True)
    grammars.matcher(req)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grammars.matcher(req)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


async def bench(
    model_dir: Path, tokens: int, streams: int, repeats: int, batch_repeats: int
) -> dict[str, Any]:
    clock = ProcessorClock()
    clock.install()
    results: dict[str, Any] = {}
    async with MLXEngine(model_dir, model_id=MODEL_ID, max_batch=streams) as engine:
        results["compile_ms"] = await trio.to_thread.run_sync(compile_ms, engine, 20)
        await one(engine, request(8, constrained=False))
        await one(engine, request(8, constrained=True))
        free: list[Run] = []
        constrained: list[Run] = []
        for _ in range(repeats):
            free.append((await one(engine, request(tokens, constrained=False)))[0])
            constrained.append((await one(engine, request(tokens, constrained=True)))[0])
        results["free"] = free
        results["constrained"] = constrained
        results["a"] = statistics.median(
            c.decode_tps / f.decode_tps for f, c in zip(free, constrained, strict=True)
        )
        free_batches: list[Batch] = []
        constrained_batches: list[Batch] = []
        for _ in range(batch_repeats):
            free_batches.append(await batch(engine, streams, tokens, constrained=False))
            constrained_batches.append(await batch(engine, streams, tokens, constrained=True))
        results["free_batches"] = free_batches
        results["constrained_batches"] = constrained_batches
        results["b"] = statistics.median(
            c.aggregate_tps / f.aggregate_tps
            for f, c in zip(free_batches, constrained_batches, strict=True)
        )
        results["processor_ms"] = clock.mean_ms
    return results


def _median_run(runs: list[Run]) -> Run:
    return Run(
        tokens=int(statistics.median(r.tokens for r in runs)),
        ttft=statistics.median(r.ttft for r in runs),
        decode_seconds=statistics.median(r.decode_seconds for r in runs),
    )


def _median_batch(batches: list[Batch]) -> Batch:
    return Batch(
        tokens=int(statistics.median(b.tokens for b in batches)),
        wall_seconds=statistics.median(b.wall_seconds for b in batches),
    )


def report(results: dict[str, Any], tokens: int, streams: int, console: Console) -> None:
    table = Table(title=f"small model, greedy, up to {tokens} tokens per stream (medians)")
    for column in ("case", "streams", "tokens", "tok/s", "TTFT ms", "vs unconstrained"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, key in (("unconstrained", "free"), ("json_schema", "constrained")):
        run = _median_run(results[key])
        ratio = "baseline" if key == "free" else f"{results['a']:.3f}x"
        table.add_row(
            f"(a) {name}",
            "1",
            str(run.tokens),
            f"{run.decode_tps:.1f}",
            f"{run.ttft * 1e3:.1f}",
            ratio,
        )
    for name, key in (("unconstrained", "free_batches"), ("json_schema", "constrained_batches")):
        b = _median_batch(results[key])
        ratio = "baseline" if key == "free_batches" else f"{results['b']:.3f}x"
        table.add_row(
            f"(b) {name}", str(streams), str(b.tokens), f"{b.aggregate_tps:.1f}", "", ratio
        )
    console.print(table)
    console.print(
        f"schema compile (matcher build): {results['compile_ms']:.2f} ms; grammar processor: "
        f"{results['processor_ms']:.3f} ms per request per step (mask, apply, and the wait "
        "for the token sampled last)."
    )
    console.print(
        "decode tok/s for single streams (tokens after the first over the time after it); "
        "aggregate tok/s for concurrent streams (all tokens over wall time)."
    )
    console.print(f"target: (a) constrained/unconstrained = {results['a']:.3f} (>= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: build `small`)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams in (b)")
    parser.add_argument("--repeats", type=int, default=7, help="single-stream pairs (median)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="concurrent pairs (median)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "small", size="small")
        results = trio.run(
            bench, model_dir, args.tokens, args.streams, args.repeats, args.batch_repeats
        )
    report(results, args.tokens, args.streams, console)


if __name__ == "__main__":
    main()
