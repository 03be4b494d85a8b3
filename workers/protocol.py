"""The wire protocol between the scheduler and workers, and between workers.

Parts:
- messages: frozen dataclasses, one per message kind (control, data, telemetry).
- `TensorPayload`: a tensor as dtype name + shape + raw buffer; it travels as its own ZeroMQ
  frame, never inside the msgpack header, so hidden states are sent without copies.
- `MESSAGE_TYPES`, `Message`: every kind, by name. The one codec that turns them into ZeroMQ
  frames and back is workers/codec.py; a malformed message raises `ProtocolError`.

Life of a request on the data plane (route = worker data addresses, stage order):
  scheduler --StartRequest--> stage 0 --Activations(start=...)--> stage 1 ... --> last stage
  last stage --TokenOutputs--> scheduler (streamed to the client)
  last stage --NextTokens--> stage 0 (the ring closes; the next decode step starts)
The request's metadata (route, sampling) rides along only on its first hop (`ActivationEntry.start`);
later steps carry just request ids and positions. Prompt token ids go to stage 0 only; the hash
chain of their full KV blocks rides on the first hop (`RequestStart.block_hashes`), so each stage
reuses the prefix the first stage reused from its own cache, or answers `PrefixMiss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.device_profile import DeviceProfile

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not match its schema."""


@dataclass(frozen=True)
class TensorPayload:
    """A tensor on the wire. `data` is any buffer (bytes, memoryview, zmq.Frame.buffer)."""

    dtype: str  # torch dtype name without prefix: "float32", "bfloat16", "float16", "int64"
    shape: tuple[int, ...]
    data: Any = field(repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Shared value types


@dataclass(frozen=True)
class SamplingParams:
    """How the last stage picks the next token. temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    num_top_logprobs: int | None = None  # None: no logprobs; 0: only the sampled token's
    # added by the agents work (issue 15); workers/sampling.py applies them in this order:
    # logit_bias, penalties, min_tokens, grammar mask, then temperature / top-k / top-p / min-p
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output (vLLM), 1.0: off
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # eos and stop_token_ids are masked until this many tokens are out
    stop_token_ids: tuple[int, ...] = ()  # end with finish_reason "stop" (like eos)
    grammar_kind: str = ""  # "": free; json_schema | json_object | regex | choice | ebnf (workers/grammar.py)
    grammar: str = ""  # the schema (JSON text), regex, choices (JSON list) or EBNF
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob + top k
    prompt_token_ids: tuple[int, ...] = ()  # set when the last stage needs the prompt (logprobs, penalty)
    output_token_ids: tuple[int, ...] = ()  # tokens generated before this run (recovery replay)


@dataclass(frozen=True)
class RequestStart:
    """What a stage must know about a request, sent once with its first activations."""

    route: tuple[str, ...]  # data addresses of every stage, in order
    scheduler_address: str
    sampling: SamplingParams
    first_token_index: int = 0  # index of the first token this run generates (>0 after recovery)
    # hash chain of the prompt's full KV blocks (workers/kv_cache.py `block_hashes`), set by the
    # first stage: later stages find the cached prefix the first stage reused by them
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ActivationEntry:
    request_id: str
    start_position: int  # tokens already in this stage's KV cache for the request
    num_tokens: int  # rows of the hidden-state tensor that belong to this request
    start: RequestStart | None = None  # set on the request's first hop only


@dataclass(frozen=True)
class NextToken:
    request_id: str
    token_id: int
    position: int  # position of this token in the sequence (= tokens before it)
    finished: bool = False  # the request ended at the last stage: free it, run nothing


@dataclass(frozen=True)
class TokenOutput:
    request_id: str
    index: int  # 0-based index of the generated token within the request's output
    token_id: int
    finish_reason: str | None = None  # "stop" (eos) or "length"
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # with the request's first token, when `prompt_logprobs` was asked for: one entry per prompt
    # token after the first, (logprob, ((token id, logprob) top alternatives...))
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()
    num_cached_tokens: int = 0  # on a run's first token: prompt tokens its prefill reused from the cache


@dataclass(frozen=True)
class ModelFacts:
    """What the scheduler needs to know of a model to place and serve it (read by workers)."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    layer_bytes: tuple[int, ...]  # parameter bytes of each decoder layer
    embedding_bytes: int  # held by the first stage
    lm_head_bytes: int  # held by the last stage (final norm + LM head, or tied embeddings)
    kv_bytes_per_token_per_layer: int
    activation_bytes_per_token: int
    eos_token_ids: tuple[int, ...] = ()
    # MoE: per layer, the bytes of its routed experts (part of layer_bytes; () for a dense model)
    expert_bytes: tuple[int, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0


# ---------------------------------------------------------------------------------------------
# Worker -> scheduler


@dataclass(frozen=True)
class Register:
    worker_id: str
    data_address: str  # where this worker's PULL socket listens, e.g. "tcp://127.0.0.1:5601"
    memory_bytes: int  # memory usable for weights + KV cache
    device: str  # "cpu", "cuda:0", "mps"
    profile: DeviceProfile | None = None  # measured figures (workers/device_profile.py); None: not measured
    pid: int = 0
    protocol_version: int = PROTOCOL_VERSION
    prefill_tokens_per_step: int = 0  # prompt tokens one step takes at most (0: not said)
    backend: str = "torch"  # the backend that runs its layers (workers/backend_plugins.py)
    public_key: str = ""  # the worker's CURVE public key (z85), authorised by `proof`
    proof: str = ""  # HMAC-SHA256(token, worker id + public key), hex (workers/curve.py)
    echo_address: str = ""  # where peers probe this worker's links (workers/peer_probe.py); "": none


@dataclass(frozen=True)
class LayersReady:
    worker_id: str
    epoch: int
    start_layer: int
    end_layer: int
    kv_capacity_tokens: int = 0
    weight_bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str
    epoch: int
    running_requests: int
    queued_items: int
    kv_free_tokens: int
    kv_capacity_tokens: int
    step_time_ewma_s: float
    tokens_processed: int
    data_address: str = ""  # lets a scheduler that evicted this worker ask it to register again
    prefix_cache_queries_tokens: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits_tokens: int = 0  # of them, found cached (cumulative)
    request_ids: tuple[str, ...] = ()  # requests this worker holds: the scheduler releases ghosts


@dataclass(frozen=True)
class LinkReport:
    """Measured links from this worker to peers (workers/link_prober.py): per peer its worker
    id, the median round-trip seconds and the bandwidth in bytes/s."""

    worker_id: str
    links: tuple[tuple[str, float, float], ...]  # (peer worker id, rtt_s, bandwidth_bytes_per_s)


@dataclass(frozen=True)
class TokenOutputs:
    worker_id: str
    outputs: tuple[TokenOutput, ...]


@dataclass(frozen=True)
class RequestFailed:
    worker_id: str
    request_id: str
    message: str
    fatal: bool = False  # the request itself is bad (refused input): no retry on another route


# ---------------------------------------------------------------------------------------------
# Scheduler -> worker


@dataclass(frozen=True)
class AssignLayers:
    epoch: int
    model_dir: str
    start_layer: int
    end_layer: int
    dtype: str = "auto"
    kv_budget_bytes: int = 256 * 2**20
    num_stages_hint: int = 1  # stages in this worker's pipelines (sizes decode microbatches)
    prefix_caching: bool = True  # keep full KV blocks of prompts and reuse them (workers/kv_cache.py)
    quantization: str = "none"  # none | int8 | int4: weight-only, quantized while loading


@dataclass(frozen=True)
class UnloadLayers:
    """Drop the layers and every request: the worker stays registered, holding nothing."""

    epoch: int


@dataclass(frozen=True)
class StartRequest:
    request_id: str
    token_ids: tuple[int, ...]  # prompt (plus already generated tokens when recovering)
    start: RequestStart


@dataclass(frozen=True)
class ReleaseRequests:
    """Finish or abort: free the KV cache and forget the requests."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class Reregister:
    """The scheduler does not know this worker (it was evicted): drop everything, register again."""

    reason: str = ""


@dataclass(frozen=True)
class ProbeLinks:
    """Measure the links to these peers and answer with a `LinkReport` (on joining, or when the
    scheduler asks again)."""

    peers: tuple[tuple[str, str, str], ...]  # (worker id, echo address, CURVE public key)


@dataclass(frozen=True)
class Shutdown:
    reason: str = ""


@dataclass(frozen=True)
class Members:
    """Who belongs to the cluster now: each worker's data address and CURVE public key (z85). A
    worker admits these keys on its data socket and takes messages only from them and the scheduler."""

    members: tuple[tuple[str, str], ...]  # (data address, public key)


# ---------------------------------------------------------------------------------------------
# Worker -> worker


@dataclass(frozen=True)
class Activations:
    entries: tuple[ActivationEntry, ...]
    hidden: TensorPayload  # [sum(num_tokens), hidden_size]


@dataclass(frozen=True)
class NextTokens:
    tokens: tuple[NextToken, ...]


@dataclass(frozen=True)
class PrefixMiss:
    """To the first stage: a later stage holds only `cached_tokens` of the prefix the first stage
    reused (evicted meanwhile); prefill the prompt again reusing at most that many."""

    request_id: str
    cached_tokens: int


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Register,
        LayersReady,
        Heartbeat,
        TokenOutputs,
        RequestFailed,
        AssignLayers,
        UnloadLayers,
        StartRequest,
        ReleaseRequests,
        Reregister,
        Shutdown,
        Members,
        Activations,
        NextTokens,
        PrefixMiss,
        LinkReport,
        ProbeLinks,
    )
}

Message = (
    Register
    | LayersReady
    | Heartbeat
    | TokenOutputs
    | RequestFailed
    | AssignLayers
    | UnloadLayers
    | StartRequest
    | ReleaseRequests
    | Reregister
    | Shutdown
    | Members
    | Activations
    | NextTokens
    | PrefixMiss
    | LinkReport
    | ProbeLinks
)
