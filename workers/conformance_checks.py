"""The checks of the backend conformance suite: each takes a `Suite` and raises AssertionError.

Parts:
- `Suite`: the backend under test (by plugin name), its device, and where tiny checkpoints go;
  `stage(...)` builds one of its stages, `torch_stage(...)` one of the torch backend's.
- `run_chain(stages, chunks, inputs)`, `greedy(stages, prompt, new_tokens)`: drive stages as the
  workers of a pipeline would (prefill, then one token per step), through the numpy boundary.
- `CHECKS`: name -> check. Equivalence with transformers for every family (one stage, two stages,
  batched and chunked steps), pipelines with torch on either side, bfloat16 across the boundary,
  KV allocation / capacity / free, `prepare`, bad input, the profile, the formats it claims (GGUF:
  F32 equal to transformers, Q8_0 / Q4_0 close to it on the file's weights; int8 / int4), or a
  clear one-line refusal of the ones it does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.backend import KVCacheFull, SequenceChunk, StageBackend, StageConfig, load_backend
from workers.backend_plugins import get_plugin
from workers.conformance_models import FAMILIES, reference, tiny_checkpoint, tiny_gguf

PROMPT = (5, 17, 42, 9, 101, 7, 64, 33, 250, 3, 12)
NEW_TOKENS = 8
ATOL = 2e-3  # float32 logits vs transformers (tiny models: observed ~1e-5)


@dataclass(frozen=True)
class Suite:
    backend: str
    root: Path
    device: str | None = None

    def stage(self, model_dir: Path, start: int, end: int, dtype: str = "float32", **config) -> StageBackend:
        device = self.device or get_plugin(self.backend).default_device()
        return load_backend(StageConfig(str(model_dir), start, end, dtype, device, **config), self.backend)

    def torch_stage(self, model_dir: Path, start: int, end: int, dtype: str = "float32") -> StageBackend:
        return load_backend(StageConfig(str(model_dir), start, end, dtype, "cpu"), "torch")

    def checkpoint(self, family: str = "llama", dtype: str = "float32") -> Path:
        return tiny_checkpoint(self.root, family, dtype)


def run_chain(stages: Sequence[StageBackend], chunks: Sequence[SequenceChunk], inputs: np.ndarray) -> np.ndarray:
    x = inputs
    for stage in stages:
        x = stage.forward(chunks, x)
    return x


def greedy(stages: Sequence[StageBackend], prompt: Sequence[int], new_tokens: int, request_id: str = "r") -> tuple[np.ndarray, list[int]]:
    """(the prompt's last-token logits, the greedy continuation)."""
    logits = run_chain(stages, [SequenceChunk(request_id, 0, len(prompt))], np.array(prompt, np.int64))
    first, tokens = logits[0].copy(), [int(np.argmax(logits[0]))]
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        logits = run_chain(stages, [SequenceChunk(request_id, position, 1)], np.array(tokens[-1:], np.int64))
        tokens.append(int(np.argmax(logits[0])))
    for stage in stages:
        stage.free(request_id)
    return first, tokens


def _close(ours: np.ndarray, theirs: np.ndarray, what: str, atol: float = ATOL) -> None:
    assert ours.dtype == np.float32, f"{what}: logits must be float32, got {ours.dtype}"
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff <= atol, f"{what}: logits differ from transformers by {diff:.2e} (> {atol:g})"


def _family_checks(family: str) -> dict[str, Callable[[Suite], None]]:
    def equivalence(suite: Suite) -> None:
        model = suite.checkpoint(family)
        ref = reference(model, PROMPT, NEW_TOKENS)
        whole = suite.stage(model, 0, 4)
        assert whole.is_first and whole.is_last and whole.dtype == "float32"
        first, tokens = greedy([whole], PROMPT, NEW_TOKENS)
        _close(first, ref.logits[-1], f"{family}, one stage")
        assert tuple(tokens) == ref.greedy, f"{family}, one stage: greedy {tokens} != transformers {ref.greedy}"
        split = [suite.stage(model, 0, 2), suite.stage(model, 2, 4)]
        assert tuple(greedy(split, PROMPT, NEW_TOKENS)[1]) == ref.greedy, f"{family}: two stages"
        # one batch: two prompts; then the first prompt's tail (a chunk on a cached prefix) beside
        # a decode of the second (continuous batching)
        short = PROMPT[:4]
        logits = run_chain(split, [SequenceChunk("a", 0, 6), SequenceChunk("b", 0, 4)], np.array(PROMPT[:6] + short, np.int64))
        assert logits.shape == (2, whole.vocab_size), f"{family}: last stage returns one row per chunk"
        _close(logits[0], ref.logits[5], f"{family}, batched prompt a")
        _close(logits[1], ref.logits[3], f"{family}, batched prompt b")
        rest = PROMPT[6:]
        chunks = [SequenceChunk("a", 6, len(rest)), SequenceChunk("b", 4, 1)]
        logits = run_chain(split, chunks, np.array(rest + (PROMPT[4],), np.int64))
        _close(logits[0], ref.logits[-1], f"{family}, chunked prefill")
        _close(logits[1], ref.logits[4], f"{family}, decode beside a prefill")

    def pipelines(suite: Suite) -> None:
        model = suite.checkpoint(family)
        ref = reference(model, PROMPT, NEW_TOKENS)
        chains = {
            "torch -> it -> torch": [suite.torch_stage(model, 0, 1), suite.stage(model, 1, 3), suite.torch_stage(model, 3, 4)],
            "it -> torch": [suite.stage(model, 0, 2), suite.torch_stage(model, 2, 4)],
            "torch -> it": [suite.torch_stage(model, 0, 2), suite.stage(model, 2, 4)],
        }
        for name, chain in chains.items():
            first, tokens = greedy(chain, PROMPT, NEW_TOKENS)
            _close(first, ref.logits[-1], f"{family}, {name}")
            assert tuple(tokens) == ref.greedy, f"{family}, {name}: greedy {tokens} != transformers {ref.greedy}"

    return {f"equivalence_{family}": equivalence, f"pipelines_with_torch_{family}": pipelines}


def check_bfloat16(suite: Suite) -> None:
    """bfloat16 crosses the boundary as uint16 bits, and means the same on both sides."""
    model = suite.checkpoint("llama", "bfloat16")
    chunks, ids = [SequenceChunk("r", 0, len(PROMPT))], np.array(PROMPT, np.int64)
    torch_only = run_chain([suite.torch_stage(model, 0, 2, "auto"), suite.torch_stage(model, 2, 4, "auto")], chunks, ids)
    ours_first = suite.stage(model, 0, 2, "auto")
    assert ours_first.dtype == "bfloat16", f"dtype auto of a bf16 checkpoint is {ours_first.dtype}"
    hidden = ours_first.forward(chunks, ids)
    assert hidden.dtype == np.uint16 and hidden.shape == (len(PROMPT), ours_first.hidden_size), "bf16 travels as uint16 bits"
    mixed = [
        suite.torch_stage(model, 2, 4, "auto").forward(chunks, hidden),
        suite.stage(model, 2, 4, "auto").forward(chunks, suite.torch_stage(model, 0, 2, "auto").forward(chunks, ids)),
    ]
    scale = float(np.max(np.abs(torch_only)))
    for logits in mixed:
        diff = float(np.max(np.abs(logits - torch_only)))
        assert diff <= 0.05 * scale, f"bf16 pipeline logits off by {diff:.3f} of {scale:.3f}"


def check_kv_cache(suite: Suite) -> None:
    model = suite.checkpoint()
    stage = suite.stage(model, 0, 2, kv_budget_bytes=64 * 1024, kv_block_size_tokens=16)
    capacity = stage.kv_capacity_tokens()
    assert capacity > 0 and capacity % 16 == 0, f"capacity {capacity} is not whole blocks"
    assert stage.kv_free_tokens() == capacity
    stage.forward([SequenceChunk("a", 0, 20)], np.arange(20, dtype=np.int64))
    assert stage.kv_free_tokens() == capacity - 32, "20 tokens take two blocks of 16"
    too_big = [SequenceChunk("b", 0, capacity)]
    assert not stage.can_allocate(too_big)
    try:
        stage.forward(too_big, np.zeros(capacity, np.int64))
        raise AssertionError("a batch larger than the free KV was run")
    except KVCacheFull:
        pass
    assert stage.kv_free_tokens() == capacity - 32, "a failed allocation changed the cache"
    stage.free("nobody")  # unknown id: no-op
    stage.free("a")
    assert stage.kv_free_tokens() == capacity, "free did not return the blocks"
    assert stage.can_allocate(too_big)


def check_prepare(suite: Suite) -> None:
    model = suite.checkpoint()
    plain, fast = suite.stage(model, 0, 4), suite.stage(model, 0, 4)
    for stage in (plain, fast):
        stage.forward([SequenceChunk("a", 0, 5), SequenceChunk("b", 0, 3)], np.array(PROMPT[:8], np.int64))
    chunks = (SequenceChunk("a", 5, 1), SequenceChunk("b", 3, 1))
    prepared = fast.prepare(chunks)
    if prepared is not None:
        assert fast.can_allocate(chunks)
    token = np.array([7, 9], np.int64)
    assert np.array_equal(fast.forward(chunks, token, prepared), plain.forward(chunks, token)), "prepared step differs"
    # a prepared step made stale by a free (the blocks reused meanwhile) must still be right
    chunks = (SequenceChunk("a", 6, 1),)
    stale = fast.prepare(chunks)
    for stage in (plain, fast):
        stage.free("b")
        stage.forward([SequenceChunk("c", 0, 30)], np.arange(3, 33, dtype=np.int64))
    token = np.array([11], np.int64)
    assert np.array_equal(fast.forward(chunks, token, stale), plain.forward(chunks, token)), "stale prepared step"


def check_bad_input(suite: Suite) -> None:
    model = suite.checkpoint()
    first, second = suite.stage(model, 0, 2), suite.stage(model, 2, 4)
    free_before = first.kv_free_tokens(), second.kv_free_tokens()
    bad = {
        "no chunks": (first, [], np.zeros(0, np.int64)),
        "rows != tokens": (first, [SequenceChunk("x", 0, 3)], np.arange(2, dtype=np.int64)),
        "token id past the vocabulary": (first, [SequenceChunk("x", 0, 1)], np.array([first.vocab_size], np.int64)),
        "float token ids": (first, [SequenceChunk("x", 0, 2)], np.zeros(2, np.float32)),
        "a chunk past the cached tokens": (first, [SequenceChunk("x", 5, 1)], np.array([3], np.int64)),
        "hidden of the wrong width": (second, [SequenceChunk("x", 0, 2)], np.zeros((2, second.hidden_size + 1), np.float32)),
        "hidden of the wrong dtype": (second, [SequenceChunk("x", 0, 2)], np.zeros((2, second.hidden_size), np.float16)),
    }
    for what, (stage, chunks, inputs) in bad.items():
        try:
            stage.forward(chunks, inputs)
        except (ValueError, KVCacheFull) as exc:
            assert str(exc) and "\n" not in str(exc).strip(), f"{what}: error is not one line: {exc!r}"
        else:
            raise AssertionError(f"{what}: no error")
    assert (first.kv_free_tokens(), second.kv_free_tokens()) == free_before, "bad input changed the KV cache"
    ref = reference(model, PROMPT, NEW_TOKENS)
    assert tuple(greedy([first, second], PROMPT, NEW_TOKENS)[1]) == ref.greedy, "the stages broke after bad input"


def check_profile(suite: Suite) -> None:
    plugin = get_plugin(suite.backend)
    assert plugin.devices(), "the backend sees no device"
    if plugin.profile is None:
        return  # a worker of this backend registers without measurements: placement uses defaults
    device = suite.device or plugin.default_device()
    profile = plugin.profile(device, str(suite.checkpoint()), 1.0, 1.0)
    profile = profile.to_json() if hasattr(profile, "to_json") else profile  # a DeviceProfile, or its JSON
    json.dumps(profile)  # it travels in Register
    assert profile.get("backend") == suite.backend, f"profile: backend {profile.get('backend')!r}"
    assert profile.get("memory_bytes", 0) > 0, "profile: memory_bytes"
    assert profile.get("matmul_flops_per_s", 0) > 0, "profile: matmul_flops_per_s"
    assert profile.get("memory_bandwidth_bytes_per_s", 0) > 0, "profile: memory_bandwidth_bytes_per_s"
    timings = profile.get("layer_timings") or {}
    steps = timings.get("decode_step_s") or []
    assert steps and all(seconds > 0 for _, _, seconds in steps), "profile: one layer's decode steps timed"


def check_formats(suite: Suite) -> None:
    plugin = get_plugin(suite.backend)
    model = suite.checkpoint()
    ref = reference(model, PROMPT, NEW_TOKENS)
    # a sanity floor on a random hidden-64 model: int4 in groups of 32 with bf16 activations (torch)
    # correlates ~0.74; exactness against the dequantized weights is tests/workers/test_quantization.py's
    for quantization, min_corr in (("int8", 0.99), ("int4", 0.7)):
        if quantization in plugin.quantizations:
            stage = suite.stage(model, 0, 4, quantization=quantization)
            assert stage.weight_bytes < suite.stage(model, 0, 4).weight_bytes, f"{quantization}: weights not smaller"
            first, _ = greedy([stage], PROMPT, 1)
            corr = float(np.corrcoef(first, ref.logits[-1])[0, 1])
            assert corr >= min_corr, f"{quantization}: logits correlate {corr:.3f} with float32's (< {min_corr})"
        else:
            _refused(lambda: suite.stage(model, 0, 4, quantization=quantization), quantization)
    if "gguf" not in plugin.weight_formats:
        gguf = suite.root / "model.gguf"
        gguf.write_bytes(b"GGUF")
        _refused(lambda: suite.stage(gguf, 0, 4), "gguf")
        return
    # a GGUF: float32 exactly; quantized types against transformers on the file's weights
    # dequantized (a floor: a backend may run quantized weights on lower-precision activations)
    for quant, min_corr in (("F32", None), ("Q8_0", 0.99), ("Q4_0", 0.99)):
        path, dequantized = tiny_gguf(suite.root, "llama", quant)
        ref = reference(dequantized, PROMPT, NEW_TOKENS)
        stages = [suite.stage(path, 0, 2, "auto"), suite.stage(path, 2, 4, "auto")]
        assert stages[0].dtype == "float32", f"GGUF {quant}: dtype auto is {stages[0].dtype}, not float32"
        first, tokens = greedy(stages, PROMPT, NEW_TOKENS)
        if min_corr is None:
            _close(first, ref.logits[-1], f"GGUF {quant}")
            assert tuple(tokens) == ref.greedy, f"GGUF {quant}: greedy {tokens} != transformers {ref.greedy}"
        else:
            corr = float(np.corrcoef(first, ref.logits[-1])[0, 1])
            assert corr >= min_corr, f"GGUF {quant}: logits correlate {corr:.4f} with its weights' (< {min_corr})"


def _refused(load: Callable[[], object], what: str) -> None:
    try:
        load()
    except Exception as exc:  # any one-line error is a refusal
        assert str(exc).strip() and "\n" not in str(exc).strip(), f"{what}: refusal is not one line: {exc!r}"
    else:
        raise AssertionError(f"{what} is not claimed by the backend but was accepted")


CHECKS: dict[str, Callable[[Suite], None]] = {
    **{name: check for family in FAMILIES for name, check in _family_checks(family).items()},
    "bfloat16": check_bfloat16,
    "kv_cache": check_kv_cache,
    "prepare": check_prepare,
    "bad_input": check_bad_input,
    "profile": check_profile,
    "formats": check_formats,
}
