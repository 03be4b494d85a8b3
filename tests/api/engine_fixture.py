"""Test support for the API layer: a small real in-process engine and a real uvicorn server.

Parts:
- `TinyEngine`: implements `api.server.EngineLike` with a random-weight float32 `LlamaForCausalLM`
  (vocab = the trained test tokenizer) run token by token with a KV cache; greedy / seeded
  temperature + top-k + top-p sampling, eos, stop strings and max_new_tokens through the real
  `IncrementalDetokenizer`, logprobs. Records started / finished / aborted request ids. Faults:
  `reject_with` (raised before the first output), `fail_after_tokens` (raised mid-stream),
  `step_delay_s` (slow generation, for disconnect tests).
- `running_server(app)`: uvicorn on 127.0.0.1 with a kernel-chosen free port in a background
  thread; yields the base URL and always stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM

from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.errors import GenerationFailedError, PromptTooLongError
from scheduler.request import GenerationOutput, GenerationRequest, TokenLogprob
from scheduler.tokenizer import Tokenizer
from tests.support.tiny_tokenizer import write_tokenizer_dir
from workers.protocol import SamplingParams


__all__ = ["TinyEngine", "running_server", "write_tokenizer_dir"]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


class TinyEngine:
    """A one-process engine good enough to drive the HTTP layer for real."""

    def __init__(self, model_dir: Path, *, model_id: str = "tiny-llama", max_model_len: int = 256) -> None:
        torch.set_num_threads(1)
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=self.tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_model_len,
            eos_token_id=list(self.tokenizer.eos_token_ids), tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config).to(torch.float32).eval()
        with torch.no_grad():  # sharper logits, so greedy text is varied and eos is rare
            self.model.lm_head.weight.mul_(40.0)
        self.started: list[GenerationRequest] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.reject_with: Exception | None = None
        self.fail_after_tokens: int | None = None
        self.step_delay_s = 0.0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self.reject_with is not None:
            raise self.reject_with
        prompt = list(request.prompt_token_ids)
        if not prompt or len(prompt) >= self.max_model_len:
            raise PromptTooLongError(f"prompt of {len(prompt)} tokens does not fit {self.max_model_len}")
        self.started.append(request)
        params = request.sampling
        max_new = min(params.max_new_tokens, self.max_model_len - len(prompt))
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        detok = IncrementalDetokenizer(self.tokenizer, prompt, request.stop, request.skip_special_tokens)
        done = False
        past, feed, generated = None, prompt, 0
        try:
            while True:
                with torch.no_grad():
                    out = self.model(input_ids=torch.tensor([feed]), cache=past, use_cache=True)
                past = out.cache
                logits = out.logits[0, -1].float()
                token = _sample(logits, params, generator)
                generated += 1
                if self.fail_after_tokens is not None and generated > self.fail_after_tokens:
                    raise GenerationFailedError("injected failure: the stage holding layer 1 went away")
                finish = None
                if token in params.eos_token_ids and not params.ignore_eos:
                    finish = "stop"
                elif generated >= max_new:
                    finish = "length"
                step = detok.add(token)
                text = step.text
                if step.stopped:
                    finish = "stop"
                elif finish is not None:
                    text += detok.flush()
                logprobs: tuple[TokenLogprob, ...] = ()
                if params.num_top_logprobs is not None:
                    lps = torch.log_softmax(logits, dim=-1)
                    top = torch.topk(lps, params.num_top_logprobs) if params.num_top_logprobs else None
                    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
                    logprobs = (TokenLogprob(token, float(lps[token]), pairs),)
                yield GenerationOutput(request.request_id, text, (token,), logprobs, finish, len(prompt), generated)
                if finish is not None:
                    done = True
                    self.finished.append(request.request_id)
                    return
                feed = [token]
                await asyncio.sleep(self.step_delay_s)
        finally:
            if not done:
                self.aborted.append(request.request_id)


@contextlib.contextmanager
def running_server(app: object) -> Iterator[str]:
    """Serve `app` on 127.0.0.1:<free port> in a thread; yields "http://127.0.0.1:<port>"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
