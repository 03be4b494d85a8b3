"""The one codec of the wire protocol (workers/protocol.py): messages <-> ZeroMQ multipart frames.

Parts:
- `encode(message)`: `[header, *tensor_frames]`; the header is msgpack `[kind, fields]`, and
  every `TensorPayload` travels as a frame of its own (its buffer, not a copy), referred to from
  the header by index. Nothing is pickled.
- `decode(frames)`: the message back, checked against its dataclass (field types, required and
  unknown fields, tensor frame references); anything malformed raises `ProtocolError`.

Encoders and decoders are compiled once per type (a closure per field, chosen from the type
hints), so a message on the data plane costs a few calls per field rather than a walk through
`typing` or a chain of isinstance checks on every hop.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from workers.protocol import MESSAGE_TYPES, Message, ProtocolError, TensorPayload

Encoder = Callable[[Any, list[Any]], Any]  # (value, frames to append tensors to) -> plain value
Decoder = Callable[[Any, list[Any]], Any]  # (plain value, received tensor frames) -> value


def encode(message: Message) -> list[Any]:
    """Message -> ZeroMQ multipart frames: msgpack header, then one frame per tensor."""
    kind = type(message).__name__
    if MESSAGE_TYPES.get(kind) is not type(message):
        raise ProtocolError(f"not a protocol message: {kind}")
    frames: list[Any] = []
    fields = _encoder(type(message))(message, frames)
    return [msgpack.packb([kind, fields], use_bin_type=True), *frames]


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


# ---------------------------------------------------------------------------------------------
# Encoders


@functools.cache
def _encoder(annotation: Any) -> Encoder:
    """The function that turns a value of `annotation` into its plain (msgpack) form."""
    return _compile_encoder(annotation)


def _encode_tensor(value: TensorPayload, frames: list[Any]) -> dict[str, Any]:
    frames.append(value.data)
    return {"__tensor__": len(frames) - 1, "dtype": value.dtype, "shape": list(value.shape)}


def _encode_as_is(value: Any, frames: list[Any]) -> Any:
    return value


def _encode_any(value: Any, frames: list[Any]) -> Any:
    """A value whose type the hints leave open (dict[str, Any], Any): by what it is."""
    if isinstance(value, TensorPayload):
        return _encode_tensor(value, frames)
    if isinstance(value, (list, tuple)):
        return [_encode_any(item, frames) for item in value]
    if isinstance(value, dict):
        return {key: _encode_any(item, frames) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encoder(type(value))(value, frames)
    return value


def _compile_encoder(annotation: Any) -> Encoder:
    if annotation is TensorPayload:
        return _encode_tensor
    if dataclasses.is_dataclass(annotation):
        return _compile_dataclass_encoder(annotation)
    if annotation in (int, float, str, bool):
        return _encode_as_is
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) != 1:
            return _encode_any
        inner_encoder = _encoder(inner[0])
        if inner_encoder is _encode_as_is:
            return _encode_as_is

        def encode_optional(value: Any, frames: list[Any]) -> Any:
            return None if value is None else inner_encoder(value, frames)

        return encode_optional
    if origin is tuple:
        item_encoders = [_encoder(arg) for arg in args if arg is not Ellipsis]
        if all(encoder is _encode_as_is for encoder in item_encoders):

            def encode_scalars(value: Any, frames: list[Any]) -> list[Any]:
                return list(value)

            return encode_scalars
        if len(args) == 2 and args[1] is Ellipsis:
            item_encoder = item_encoders[0]

            def encode_sequence(value: Any, frames: list[Any]) -> list[Any]:
                return [item_encoder(item, frames) for item in value]

            return encode_sequence

        def encode_fixed(value: Any, frames: list[Any]) -> list[Any]:
            return [encoder(item, frames) for encoder, item in zip(item_encoders, value)]

        return encode_fixed
    return _encode_any


def _compile_dataclass_encoder(cls: type) -> Encoder:
    hints = typing.get_type_hints(cls)
    fields = tuple((f.name, _encoder(hints[f.name])) for f in dataclasses.fields(cls))

    def encode_dataclass(value: Any, frames: list[Any]) -> dict[str, Any]:
        return {name: encoder(getattr(value, name), frames) for name, encoder in fields}

    return encode_dataclass


# ---------------------------------------------------------------------------------------------
# Decoders


@functools.cache
def _decoder(annotation: Any) -> Decoder:
    """The function that turns the plain (msgpack) form of `annotation` back into its value."""
    return _compile(annotation)


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
