"""The planner's view of workers: measured prefill as well as decode, and the workload mix."""
from __future__ import annotations

import pytest

from placement import clock
from placement.problem import PlacementProblem
from scheduler.cluster import WorkerState
from scheduler.planner import (RUNTIME_OVERHEAD_BYTES, PlannerConfig, default_kv_tokens, device_spec, kv_budget_bytes,
                               model_spec, plan_layers, stage_weight_bytes)
from workers.device_profile import DeviceProfile, LayerTimings
from workers.protocol import ModelFacts

LAYER_BYTES = 400 * 2**20
MODEL = ModelFacts("llama", 32, 4096, 32000, 4096, "float16", (LAYER_BYTES,) * 32, 250 * 2**20, 250 * 2**20,
                   2 * 8 * 128 * 2, 4096 * 2)


def _worker(worker_id: str, host: str, decode_s: tuple[float, float], prefill_s: float,
            memory_bytes: int) -> WorkerState:
    """Profile as a worker reports it: per-layer decode steps at batch 1 and 64, prefill per token."""
    timings = LayerTimings("m", 1, LAYER_BYTES, "float16", ((1, 128, decode_s[0]), (64, 128, decode_s[1])),
                           ((128, prefill_s * 1.3), (512, prefill_s)))
    profile = DeviceProfile("cuda", "cuda", "cuda: test", memory_bytes, 1e14, "float16", 1e12, 0.0, 0.0, layer_timings=timings)
    return WorkerState(worker_id, f"tcp://{host}:7000", memory_bytes, "cuda", profile, 1, 0.0, 0.0)


# neither holds the 12.5 GiB model alone: a GPU (about 27 layers fit) with memory-bound decode and
# fast prefill; a CPU box whose decode is as fast per token at batch 64 (bandwidth) but whose
# prefill is 40x slower (compute)
GPU = ("gpu", "10.0.0.1", (0.0006, 0.0012), 2.0e-6, 12 * 2**30)
CPU = ("cpu", "10.0.0.2", (0.0040, 0.0012), 8.0e-5, 12 * 2**30)


def test_device_spec_carries_measured_prefill() -> None:
    spec = device_spec(_worker(*GPU), MODEL)
    assert spec.decode_layer_time_s == ((1, 0.0006), (64, 0.0012))
    assert spec.prefill_layer_time_per_token_s == 2.0e-6   # the longest prompt timed
    bare = WorkerState("w", "tcp://h:1", 2**34, "cpu", None, 1, 0.0, 0.0)   # registered with --no-profile
    assert device_spec(bare, MODEL).prefill_layer_time_per_token_s is None   # roofline: derived from FLOP/s


def test_workload_mix_moves_layers_off_a_slow_prefill_device() -> None:
    workers = [_worker(*GPU), _worker(*CPU)]
    cfg = PlannerConfig(max_model_len=2048, max_concurrent_sequences=4, time_limit_s=1.0, placement="solver")
    with clock.work_budget():   # the solver's limit in work seconds: the same plans on a loaded machine
        decode_only = plan_layers(MODEL, workers, PlannerConfig(**{**cfg.__dict__, "prompt_tokens_per_output_token": 0.0}), 1)
        mixed = plan_layers(MODEL, workers, PlannerConfig(**{**cfg.__dict__, "prompt_tokens_per_output_token": 4.0}), 1)

    def layers(plan, wid: str) -> int:
        s, e = plan.ranges.get(wid, (0, 0))
        return e - s
    # decode alone: the two are alike per token at full batch, so they split the layers
    assert layers(decode_only, "gpu") + layers(decode_only, "cpu") == 32 and layers(decode_only, "cpu") >= 12
    # with 4 prompt tokens per output token the CPU's prefill dominates: it holds far fewer
    assert layers(mixed, "cpu") < layers(decode_only, "cpu") / 2
    assert mixed.predicted_tokens_per_s < decode_only.predicted_tokens_per_s   # prefill is charged


def test_invalid_mix_is_rejected() -> None:
    spec = device_spec(_worker(*GPU), MODEL)
    with pytest.raises(ValueError, match="prompt_tokens_per_output_token"):
        PlacementProblem(model_spec(MODEL), (spec,), prompt_tokens_per_output_token=-1.0)
    with pytest.raises(ValueError, match="prompt_tokens_per_output_token"):
        PlacementProblem(model_spec(MODEL), (spec,), prompt_tokens_per_output_token=float("nan"))


def test_a_one_machine_pipeline_has_a_prediction_its_stages_times_add_up_to() -> None:
    """Co-located stages run one after the other: 1 / predicted = the sum of 1 / each stage's rate."""
    a = _worker("a", "10.0.0.9", (0.0040, 0.0012), 8.0e-5, 12 * 2**30)
    b = _worker("b", "10.0.0.9", (0.0040, 0.0012), 8.0e-5, 12 * 2**30)
    plan = plan_layers(MODEL, [a, b], PlannerConfig(max_model_len=2048, prompt_tokens_per_output_token=0.0), 1)
    assert plan.co_located and plan.ranges == {"a": (0, 16), "b": (16, 32)}
    one_stage = 64 / (16 * 0.0012)  # batch 64 over 16 layers of 1.2 ms per layer step
    assert plan.predicted_tokens_per_s == pytest.approx(one_stage / 2, rel=1e-6)


# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, fp32 -> 2 x 3 x 64 x 4 = 1536 KV bytes per token per layer
SMOLLM2 = ModelFacts("llama", 30, 576, 49152, 8192, "float32", (14_155_776,) * 30, 113_246_208, 113_246_208,
                     1536, 576 * 4)


def _cpu_box(memory_bytes: int) -> WorkerState:
    return WorkerState("w", "tcp://127.0.0.1:7000", memory_bytes, "cpu", None, 1, 0.0, 0.0)


def test_default_kv_budget_is_what_context_and_concurrency_need() -> None:
    big = _cpu_box(64 * 2**30)  # memory is not what sizes it
    config = PlannerConfig(max_model_len=2048, max_concurrent_sequences=16)
    assert default_kv_tokens(2048, 16) == config.stage_kv_tokens == 32768
    assert kv_budget_bytes(SMOLLM2, big, 0, 30, config) == 1536 * 30 * 2048 * 16  # 1.5 GB, not 90% of 64 GiB
    assert kv_budget_bytes(SMOLLM2, big, 10, 20, config) == 1536 * 10 * 2048 * 16  # a stage: its own layers
    assert kv_budget_bytes(SMOLLM2, _cpu_box(128 * 2**30), 0, 30, config) == kv_budget_bytes(SMOLLM2, big, 0, 30, config)
    one = PlannerConfig(max_model_len=8192, max_concurrent_sequences=1)
    assert kv_budget_bytes(SMOLLM2, big, 0, 30, one) == 1536 * 30 * 8192


def test_kv_tokens_raises_the_budget_up_to_the_memory_left() -> None:
    config = PlannerConfig(max_model_len=2048, max_concurrent_sequences=16, kv_tokens=100_000)
    assert kv_budget_bytes(SMOLLM2, _cpu_box(64 * 2**30), 0, 30, config) == 1536 * 30 * 100_000
    small = _cpu_box(2 * 2**30)  # 2 GiB: weights + overhead leave ~1.3 GiB, of which 90% may be KV
    left = small.memory_bytes - stage_weight_bytes(SMOLLM2, 0, 30) - RUNTIME_OVERHEAD_BYTES
    assert kv_budget_bytes(SMOLLM2, small, 0, 30, config) == int(left * 0.9)
