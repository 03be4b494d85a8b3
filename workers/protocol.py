"""The wire protocol between the scheduler and workers, and between workers.

Parts:
- messages: frozen dataclasses, one per message kind (control, data, telemetry).
- `TensorPayload`: a tensor as dtype name + shape + raw buffer; it travels as its own ZeroMQ
  frame, never inside the msgpack header, so hidden states are sent without copies.
- `encode` / `decode`: the one codec. A message is `[header, *tensor_frames]` where the header is
  msgpack `[kind, fields]`. Nothing is pickled; a malformed message raises `ProtocolError`.

Life of a request on the data plane (route = worker data addresses, stage order):
  scheduler --StartRequest--> stage 0 --Activations(start=...)--> stage 1 ... --> last stage
  last stage --TokenOutputs--> scheduler (streamed to the client)
  last stage --NextTokens--> stage 0 (the ring closes; the next decode step starts)
The request's metadata (route, sampling) rides along only on its first hop (`ActivationEntry.start`);
later steps carry just request ids and positions. Prompt token ids go to stage 0 only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

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


@dataclass(frozen=True)
class RequestStart:
    """What a stage must know about a request, sent once with its first activations."""

    route: tuple[str, ...]  # data addresses of every stage, in order
    scheduler_address: str
    sampling: SamplingParams
    first_token_index: int = 0  # index of the first token this run generates (>0 after recovery)


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


# ---------------------------------------------------------------------------------------------
# Worker -> scheduler


@dataclass(frozen=True)
class Register:
    worker_id: str
    data_address: str  # where this worker's PULL socket listens, e.g. "tcp://127.0.0.1:5601"
    memory_bytes: int  # memory usable for weights + KV cache
    device: str  # "cpu", "cuda:0", "mps"
    profile: dict[str, Any] = field(default_factory=dict)  # measured figures (workers/profiler)
    pid: int = 0
    protocol_version: int = PROTOCOL_VERSION
    prefill_tokens_per_step: int = 0  # prompt tokens one step takes at most (0: not said)


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


@dataclass(frozen=True)
class TokenOutputs:
    worker_id: str
    outputs: tuple[TokenOutput, ...]


@dataclass(frozen=True)
class RequestFailed:
    worker_id: str
    request_id: str
    message: str


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
class Shutdown:
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Worker -> worker


@dataclass(frozen=True)
class Activations:
    entries: tuple[ActivationEntry, ...]
    hidden: TensorPayload  # [sum(num_tokens), hidden_size]


@dataclass(frozen=True)
class NextTokens:
    tokens: tuple[NextToken, ...]


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
        Activations,
        NextTokens,
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
    | Activations
    | NextTokens
)

# ---------------------------------------------------------------------------------------------
# Codec


# Encoders and decoders are compiled once per type (a closure per field), so a message on the data
# plane costs a few calls per field rather than a walk through `typing` on every hop.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _to_plain(value: Any, frames: list[Any]) -> Any:
    if isinstance(value, TensorPayload):
        frames.append(value.data)
        return {"__tensor__": len(frames) - 1, "dtype": value.dtype, "shape": list(value.shape)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_to_plain(item, frames) for item in value]
    if isinstance(value, dict):
        return {key: _to_plain(item, frames) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return {name: _to_plain(getattr(value, name), frames) for name in _field_names(type(value))}
    return value


def encode(message: Message) -> list[Any]:
    """Message -> ZeroMQ multipart frames: msgpack header, then one frame per tensor."""
    kind = type(message).__name__
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"not a protocol message: {kind}")
    frames: list[Any] = []
    fields = _to_plain(message, frames)
    return [msgpack.packb([kind, fields], use_bin_type=True), *frames]


Decoder = typing.Callable[[Any, list[Any]], Any]
_DECODERS: dict[Any, Decoder] = {}


def _decoder(annotation: Any) -> Decoder:
    """The function that turns the plain (msgpack) form of `annotation` back into its value."""
    decoder = _DECODERS.get(annotation)
    if decoder is None:
        decoder = _DECODERS[annotation] = _compile(annotation)
    return decoder


def _scalar(kind: type, name: str, accepts: tuple[type, ...], convert: typing.Callable[[Any], Any] | None = None) -> Decoder:
    def decode_scalar(value: Any, frames: list[Any]) -> Any:
        if not isinstance(value, accepts) or (kind is not bool and isinstance(value, bool)):
            raise ProtocolError(f"expected {name}, got {value!r}")
        return convert(value) if convert is not None else value

    return decode_scalar


def _decode_tensor(value: Any, frames: list[Any]) -> TensorPayload:
    if not isinstance(value, dict) or "__tensor__" not in value:
        raise ProtocolError("expected a tensor reference")
    index = value["__tensor__"]
    if not isinstance(index, int) or not 0 <= index < len(frames):
        raise ProtocolError(f"tensor frame {index!r} missing")
    return TensorPayload(str(value["dtype"]), tuple(int(d) for d in value["shape"]), frames[index])


def _compile(annotation: Any) -> Decoder:
    if annotation is TensorPayload:
        return _decode_tensor
    if dataclasses.is_dataclass(annotation):
        return _compile_dataclass(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = next((arg for arg in args if arg is not type(None)), None)
        inner_decoder = _decoder(inner) if inner is not None else (lambda value, frames: value)
        optional = type(None) in args

        def decode_union(value: Any, frames: list[Any]) -> Any:
            if value is None and optional:
                return None
            return inner_decoder(value, frames)

        return decode_union
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item_decoder = _decoder(args[0])

            def decode_sequence(value: Any, frames: list[Any]) -> tuple[Any, ...]:
                if not isinstance(value, (list, tuple)):
                    raise ProtocolError(f"expected a list, got {type(value).__name__}")
                return tuple(item_decoder(item, frames) for item in value)

            return decode_sequence
        item_decoders = tuple(_decoder(arg) for arg in args)

        def decode_fixed(value: Any, frames: list[Any]) -> tuple[Any, ...]:
            if not isinstance(value, (list, tuple)):
                raise ProtocolError(f"expected a list, got {type(value).__name__}")
            if len(item_decoders) != len(value):
                raise ProtocolError("tuple of the wrong length")
            return tuple(decoder(item, frames) for decoder, item in zip(item_decoders, value))

        return decode_fixed
    if annotation is int:
        return _scalar(int, "int", (int,))
    if annotation is float:
        return _scalar(float, "float", (int, float), float)
    if annotation is str:
        return _scalar(str, "str", (str,))
    if annotation is bool:
        return _scalar(bool, "bool", (bool,))
    return lambda value, frames: value  # dict[str, Any], Any: taken as sent


def _compile_dataclass(cls: type) -> Decoder:
    hints = typing.get_type_hints(cls)
    fields = tuple(
        (f.name, _decoder(hints[f.name]), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    )
    names = frozenset(name for name, _, _ in fields)

    def decode_dataclass(value: Any, frames: list[Any]) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"{cls.__name__}: expected a map of fields")
        kwargs = {}
        for name, decoder, required in fields:
            if name in value:
                kwargs[name] = decoder(value[name], frames)
            elif required:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
        if len(value) != len(kwargs):
            unknown = set(value) - names
            if unknown:
                raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**kwargs)

    return decode_dataclass


def decode(frames: list[Any]) -> Message:
    """ZeroMQ multipart frames (bytes or zmq.Frame) -> Message. Raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    buffers = [getattr(frame, "buffer", frame) for frame in frames]
    try:
        header = msgpack.unpackb(buffers[0], raw=False)
    except Exception as exc:  # msgpack raises several types
        raise ProtocolError(f"undecodable header: {exc}") from None
    if not isinstance(header, list) or len(header) != 2 or not isinstance(header[0], str):
        raise ProtocolError("header must be [kind, fields]")
    kind, fields = header
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        return _decoder(cls)(fields, buffers[1:])
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{kind}: {exc}") from None
