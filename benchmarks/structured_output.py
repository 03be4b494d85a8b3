"""The per-token cost of constrained decoding: decode tok/s with a json_schema vs free text.

    python -m benchmarks.structured_output [--rounds 5] [--tokens 64] [--vocab 32000] [--workers 2]

Serves a random-weight Llama (hidden 256, 4 layers, a trained BPE tokenizer padded to `--vocab`
tokens, float32) with `potluck serve` and real worker processes, then in each round sends, one
after the other (order alternating between rounds), a free-text completion and one under a JSON
schema whose values are long enough that every request generates exactly `--tokens` tokens
(`ignore_eos` for free text; for the schema, a string of `--tokens` characters). The decode rate
of each is (tokens - 1) / (time to last token - time to first token), from a streamed response.
Prints each round and the median ratio json_schema / free text, and before that the last stage's
sampling step alone (mask + accept vs plain sampling, ms per token, on random logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.checkpoints import make_checkpoint
from tests.support.served import ServedModel


def decode_rate(url: str, model: str, tokens: int, extra: dict) -> tuple[float, int]:
    """(decode tokens per second, tokens generated) of one streamed completion."""
    body = {"model": model, "prompt": "Describe the cluster:", "max_tokens": tokens, "temperature": 1.0, "seed": 1,
            "stream": True, "logprobs": 0, **extra}
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                stamps.extend([time.perf_counter()] * len((choice.get("logprobs") or {}).get("tokens") or []))
    if len(stamps) < 2:
        return 0.0, len(stamps)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def sampler_cost_ms(model_dir: Path, vocab: int, schema: dict, steps: int) -> dict[str, float]:
    """Median ms per token of the last stage's sampling step alone (workers/request_sampler.py),
    free vs under the schema's grammar (mask + accept), on random logits: the cost without the
    model, unaffected by how busy the machine's other cores are."""
    import torch

    from workers.protocol import SamplingParams
    from workers.request_sampler import StageSampler

    sampler = StageSampler(str(model_dir), vocab)
    params = {
        "free text": SamplingParams(steps, temperature=1.0, seed=1, ignore_eos=True),
        "json_schema": SamplingParams(steps, temperature=1.0, seed=1, eos_token_ids=(2,), grammar_kind="json_schema",
                                      grammar=json.dumps(schema)),
    }
    rows = torch.randn(steps, 1, vocab, generator=torch.Generator().manual_seed(0)) * 3
    out = {}
    for name, p in params.items():
        times = []
        for i in range(steps):
            start = time.perf_counter()
            token, _ = sampler.sample([name], [p], [i], rows[i], [1])[0]
            times.append(time.perf_counter() - start)
            if token.token_id == 2:
                break
        out[name] = 1000 * statistics.median(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": args.tokens,
                                                        "maxLength": args.tokens}},
              "required": ["text"], "additionalProperties": False}
    configs = {
        "free text": {"ignore_eos": True},
        "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}}},
    }
    with tempfile.TemporaryDirectory() as root:
        path = make_checkpoint(Path(root) / "bench", "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=args.vocab,
                               max_position_embeddings=2048)
        cost = sampler_cost_ms(path, args.vocab, schema, args.tokens)
        print(f"last-stage sampling alone: free text {cost['free text']:.3f} ms/token, json_schema "
              f"{cost['json_schema']:.3f} ms/token (+{cost['json_schema'] - cost['free text']:.3f} ms)", flush=True)
        with ServedModel(path, args.workers) as served:
            served.wait_ready(path.name)
            for extra in configs.values():  # warm up (the grammar compiler reads the vocabulary once)
                decode_rate(served.url, path.name, 8, extra)
            ratios = []
            for r in range(args.rounds):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                rates = {name: decode_rate(served.url, path.name, args.tokens, configs[name]) for name in order}
                ratio = rates["json_schema"][0] / rates["free text"][0]
                ratios.append(ratio)
                print(f"round {r + 1}: free text {rates['free text'][0]:.1f} tok/s ({rates['free text'][1]} tokens), "
                      f"json_schema {rates['json_schema'][0]:.1f} tok/s ({rates['json_schema'][1]} tokens), "
                      f"ratio {ratio:.3f}", flush=True)
    print(f"json_schema / free text decode tok/s: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {args.rounds} rounds, vocab {args.vocab}, {args.workers} workers)")


if __name__ == "__main__":
    main()
