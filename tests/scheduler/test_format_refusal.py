"""Placement respects a backend's refusal: a worker whose backend does not claim the served model's
weight format or quantization is marked refused (one line, why) at registration and never planned.
The end-to-end case (a real serve with the example numpy backend and a GGUF) is in
tests/e2e/test_example_backend.py."""

from __future__ import annotations

from scheduler.cluster import Cluster, weight_format
from workers import codec
from workers import protocol as p
from workers.backend_plugins import claimed_formats


def _register(worker_id: str, backend: str, formats: tuple[str, ...], quantizations: tuple[str, ...]) -> p.Register:
    message = p.Register(worker_id, "tcp://127.0.0.1:1", 2**30, "cpu", backend=backend,
                         weight_formats=formats, quantizations=quantizations)  # fmt: skip
    return codec.decode(codec.encode(message))  # the fields travel on the wire


def test_a_worker_that_does_not_claim_the_format_is_refused_with_a_reason():
    cluster = Cluster(4, weight_format="gguf")
    torch_worker = cluster.register(_register("a", "torch", ("gguf", "safetensors"), ("int4", "int8")))
    numpy_worker = cluster.register(_register("b", "numpy", ("safetensors",), ()))
    old_worker = cluster.register(_register("c", "torch", (), ()))  # said nothing: taken as before
    assert torch_worker.refused is None and old_worker.refused is None
    assert numpy_worker.refused == "backend numpy does not read gguf weights (it reads safetensors)"


def test_a_worker_that_does_not_claim_the_quantization_is_refused():
    cluster = Cluster(4, quantization="int8")
    numpy_worker = cluster.register(_register("b", "numpy", ("safetensors",), ()))
    assert numpy_worker.refused == "backend numpy does not run int8 quantization (it runs none)"
    assert Cluster(4).register(_register("b", "numpy", ("safetensors",), ())).refused is None


def test_in_tree_backends_claim_what_they_load():
    assert claimed_formats("torch") == {"weight_formats": ("gguf", "safetensors"), "quantizations": ("int4", "int8")}
    assert claimed_formats("mlx")["weight_formats"] == ("gguf", "safetensors")
    assert weight_format("/models/x.gguf") == "gguf" and weight_format("/models/llama") == "safetensors"
