"""MoE GGUF files (llama.cpp's stacked `blk.N.ffn_*_exps` experts) on 1, 2 and 3 stages.

Families: Qwen3-MoE (architecture `qwen3moe`) and Mixtral (`llama` with `expert_count`), written
by tests/gguf_checkpoints.py in F32, Q8_0, Q4_0 and Q4_K (hidden, expert and attention widths of
256, so that K-quant rows fit).

References: Qwen3-MoE is transformers 5.25 loading the same GGUF (`gguf_file=`), given the
checkpoint's config: its qwen3moe GGUF config mapping has no `expert_feed_forward_length`, so
without it the experts' shapes mismatch and loading fails (checked below). Transformers cannot
load a Mixtral GGUF at all (`llama` there has no expert tensors), so Mixtral's reference is
transformers on the GGUF's tensors dequantized by `gguf.quants.dequantize` and saved as
safetensors (F32 also against the original checkpoint: the same weights).

Tolerances: F32 runs dense in float32, summed in another order than transformers': atol 5e-4
(measured up to 1.2e-4, Mixtral, logits up to ~10) and every greedy token equal, on top-2
checkpoints (Qwen3-MoE 2 of 8 experts, Mixtral 2 of 4). Quantized files run through the int4
kernel on bfloat16 activations (each linear layer ~2^-8 relative, as in test_gguf_stages.py):
8% of the largest reference logit, and the same greedy token wherever the reference's top two
logits are further apart than twice that. Top-k routing is discontinuous: where a router's k-th
and (k+1)-th logits nearly tie, that ~2^-8 error picks another expert and the layer's output
moves by a whole expert. Measured on these models: the kernel moves the first MoE layer's router
logits by up to 0.044 (Q8_0) while the reference's smallest top-2 margin over 14 positions x 3
layers was 0.0-0.05 for most seeds, so no fixed tolerance holds for quantized top-2 files. The
quantized files are therefore written from checkpoints that route every token to all 4 experts
(`num_experts_per_tok` = `num_experts`: routing weights stay continuous, a softmax, renormalised
as each family does); top-k selection itself is checked by the F32 files here and by the
safetensors MoE tests (tests/workers/test_moe.py). Quantized top-2 files are checked to give the
same logits on 1, 2 and 3 stages and to stay within the tolerance at the first position.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_checkpoints import dequantized_checkpoint, write_gguf  # noqa: E402

from workers.backend import SequenceChunk, StageConfig  # noqa: E402
from workers.gguf_file import open_gguf  # noqa: E402
from workers.model_facts import read_model_facts  # noqa: E402
from workers.torch_backend import TorchStageBackend  # noqa: E402

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]
NEW_TOKENS = 6
QUANTS = ["F32", "Q8_0", "Q4_0", "Q4_K"]
WIDE = dict(hidden_size=256, num_hidden_layers=3, tie_word_embeddings=False)  # K-quants: 256-wide rows
FAMILIES = {  # top-2 routing
    "qwen3_moe": dict(WIDE, moe_intermediate_size=256, head_dim=64, mlp_only_layers=[], seed=21),
    "mixtral": dict(WIDE, intermediate_size=256, seed=22),
}
ALL_ROUTED = {  # every token to all 4 experts (see the module doc)
    "qwen3_moe": dict(FAMILIES["qwen3_moe"], num_experts=4, num_experts_per_tok=4),
    "mixtral": dict(FAMILIES["mixtral"], num_experts_per_tok=4),
}
BOUNDS = ([(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)])


@pytest.fixture(scope="module")
def moe_ggufs(checkpoint_factory, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, routing "top2" | "all") -> (checkpoint, {quant: GGUF})."""
    out = {}
    for routing, specs in (("top2", FAMILIES), ("all", ALL_ROUTED)):
        for family, overrides in specs.items():
            model_dir = checkpoint_factory(family, **overrides)
            folder = tmp_path_factory.mktemp(f"gguf-{family}-{routing}")
            out[family, routing] = model_dir, {q: write_gguf(model_dir, folder / f"{family}-{q}.gguf", q) for q in QUANTS}
    return out


def load_reference(family: str, model_dir: Path, path: Path) -> transformers.PreTrainedModel:
    if family == "qwen3_moe":
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
        )
    else:
        folder = dequantized_checkpoint(path, model_dir, path.parent / f"{path.stem}-dequantized")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def reference_run(model: transformers.PreTrainedModel) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after PROMPT and the logits of every position of prompt + tokens."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(generated).logits[0]
    return generated[0, len(PROMPT) :].tolist(), logits


def bytes_wanted(path: Path, start: int, end: int, num_layers: int = 3) -> set[tuple[str, int, int]]:
    model = open_gguf(str(path.resolve()))
    return {
        (str(i.path), i.start_byte, i.start_byte + i.num_bytes)
        for n, i in model.tensors.items()
        if (n.startswith("model.layers.") and start <= int(n.split(".")[2]) < end)
        or (start == 0 and n.startswith("model.embed_tokens."))
        or (end == num_layers and (n.startswith("model.norm.") or n.startswith("lm_head.")))
    }


def run_chain(path: Path, bounds: list[tuple[int, int]]) -> tuple[list[TorchStageBackend], list[torch.Tensor]]:
    """The stages of `bounds`, each checked to have read exactly its own tensors' bytes, and the
    last-position logits of PROMPT then of each of NEW_TOKENS - 1 teacher-forced tokens (fed by
    `next_tokens`, set by the caller after the call: see `decode`)."""
    chain = [TorchStageBackend(StageConfig(str(path), a, b, kv_budget_bytes=2**21)) for a, b in bounds]
    for backend, (a, b) in zip(chain, bounds):  # each stage read exactly its own tensors' bytes
        wanted = bytes_wanted(path, a, b)
        assert set(backend.gguf_bytes_read) == wanted and len(backend.gguf_bytes_read) == len(wanted)
    return chain


def decode(chain: list[TorchStageBackend], tokens: list[int]) -> list[torch.Tensor]:
    """Logits after PROMPT, then after each of `tokens` fed one at a time (teacher-forced)."""
    outputs, position = [], 0
    for inputs in [PROMPT] + [[t] for t in tokens]:
        x = torch.tensor(inputs)
        for backend in chain:
            x = backend.forward([SequenceChunk("r", position, len(inputs))], x)
        position += len(inputs)
        outputs.append(x[0])
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_gguf_stages_match_transformers(moe_ggufs, family, quant):
    model_dir, files = moe_ggufs[family, "top2" if quant == "F32" else "all"]
    path = files[quant]
    expected, ref_logits = reference_run(load_reference(family, model_dir, path))
    if quant == "F32" and family == "mixtral":  # the F32 file's reference is the original checkpoint's
        original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert reference_run(original)[0] == expected
    atol = 5e-4 if quant == "F32" else 0.08 * float(ref_logits.abs().max())
    for bounds in BOUNDS:
        chain = run_chain(path, bounds)
        assert all(layer.moe is not None for backend in chain for layer in backend.model.layers)
        assert all((layer.moe.linears is not None) == (quant != "F32") for b in chain for layer in b.model.layers)
        outputs = decode(chain, expected[:-1])
        for step, x in enumerate(outputs):
            position = len(PROMPT) + step  # logits of the token at `position`
            torch.testing.assert_close(x, ref_logits[position - 1], atol=atol, rtol=0, msg=lambda m: f"{bounds} position {position}: {m}")
            top2 = ref_logits[position - 1].topk(2).values
            # greedy equality wherever the reference's choice is not within the tolerance of a tie
            if quant == "F32" or float(top2[0] - top2[1]) > 2 * atol:
                assert int(x.argmax()) == expected[step], (bounds, position)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_top2_moe_gguf_same_on_1_2_3_stages(moe_ggufs, family):
    """Quantized top-2 files: no reference (see the module doc), but splitting the layers over
    stages changes no value, and each stage reads only its own bytes."""
    _, files = moe_ggufs[family, "top2"]
    path = files["Q4_K"]
    runs = [decode(run_chain(path, bounds), [11, 12, 13]) for bounds in BOUNDS]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_transformers_needs_the_config_for_a_qwen3moe_gguf(moe_ggufs):
    """Why the Qwen3-MoE reference is given the checkpoint's config (see the module doc)."""
    _, files = moe_ggufs["qwen3_moe", "top2"]
    with pytest.raises(RuntimeError, match="mismatched"):
        transformers.AutoModelForCausalLM.from_pretrained(str(files["F32"].parent), gguf_file=files["F32"].name)


def test_moe_gguf_layer_bytes_count_every_expert(moe_ggufs):
    """Placement's per-layer bytes are the file's: attention, norms, router and all experts."""
    for family in FAMILIES:
        _, files = moe_ggufs[family, "top2"]
        for quant in ("F32", "Q4_K"):
            facts = read_model_facts(files[quant])
            model = open_gguf(str(files[quant].resolve()))
            for layer in range(3):
                prefix = f"model.layers.{layer}."
                total = sum(i.num_bytes for n, i in model.tensors.items() if n.startswith(prefix))
                experts = sum(i.num_bytes for n, i in model.tensors.items() if n.startswith(prefix + "mlp.experts."))
                assert facts.layer_bytes[layer] == total and facts.expert_bytes[layer] == experts
                assert 0.6 * total < experts < total
            assert (facts.model_type, facts.experts_per_token) == (family, 2)
            assert facts.num_experts == (8 if family == "qwen3_moe" else 4)
        f32, q4k = (read_model_facts(files[q]).layer_bytes[0] for q in ("F32", "Q4_K"))
        assert 6.0 < f32 / q4k < 7.2  # 32 bits a weight vs Q4_K's 4.5 (the F32 router and norms aside)
