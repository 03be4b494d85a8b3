"""Linear layers through whichever equivalent GEMM runs faster on this device.

Parts:
- `GemmChooser`: for weights stored transposed, `w_t` [in, out], computes `x @ w_t` (+ bias)
  either as the row form `x @ w_t` or as the column form `(w_t^T @ x^T)^T`. Both read the same
  memory; which one the BLAS runs faster depends on the library, the core count and the number of
  rows. On one 2-core CPU (MKL, torch 2.13), 16 rows on 2 threads: the row form streams every
  weight once per thread (it splits the 16 rows), the column form splits the weight, ~15-30%
  faster per layer; at 1-12 rows or on 1 thread the row form wins, at 2-8 rows by 2-4x.
  So the choice is measured on this device, online: for each (weight shape, rows, threads) the
  first calls alternate the two forms on the real work, then the faster (least of
  `TRIALS_PER_FORM` timings) is used from then on. Layers of one shape share their decision.
- Forms are only chosen on CPU (timing an asynchronous CUDA/MPS call would measure nothing);
  elsewhere, and for one row or for prefill-sized row counts, the row form is used.
- oneDNN (`pack_weight`, `onednn_linear`, `onednn_is_faster`): on x86 CPUs torch also ships
  oneDNN, whose JIT kernels take a weight packed once into their blocked layout. On one 2-core
  AMD EPYC (where MKL does not take its fastest paths) it ran a layer's GEMMs 2.2x faster than
  the best MKL form at 16 rows, 2x at 512 rows and 1.1x at one row. `onednn_is_faster` times
  both at 16 rows on a real weight of the model when a stage is built; the stage then stores its
  weights in the winner's layout (workers/stage_model.py), so nothing is held twice.

All forms give the same result up to float rounding (summation order).
"""

from __future__ import annotations

import time

import torch

TRIALS_PER_FORM = 3
MAX_TUNED_ROWS = 64  # more rows (prefill): compute-bound either way, the row form is used

ROW, COLUMN = "row", "column"


def row_form(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [N, in], w_t: [in, out] -> [N, out]
    return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


def column_form(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # [out, in] (a transposed view, no copy) @ [in, N] -> [out, N], returned as a contiguous [N, out]
    if bias is None:
        out = torch.mm(w_t.t(), x.t())
    else:
        out = torch.addmm(bias[:, None], w_t.t(), x.t())
    return out.t().contiguous()


FORMS = {ROW: row_form, COLUMN: column_form}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight in oneDNN's blocked layout (an opaque mkldnn tensor of the same size)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [N, in] -> [N, out]. The op's one overload called directly: the overload packet's
    # resolution cost ~30 us a call on a loaded 2-core VM, at 120 linear layers a step (SmolLM2).
    return _LINEAR_POINTWISE(x.contiguous(), packed, bias, "none", [], "")


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if onednn_available() else None


# The layout is chosen by timing 16 rows (a batched decode step), where the two differ most; a
# single row's weight sits in the cache and misleads the choice when many workers load at once.
# MKL is kept only when it is faster by more than MKL_MARGIN. Measurements: docs/performance-notes.md.
MKL_MARGIN = 0.9
TIMED_ROWS = 16


def onednn_is_faster(weight: torch.Tensor, repeats: int = 7) -> bool:
    """Whether oneDNN with a packed copy of `weight` [out, in] runs it faster than the best MKL
    form, timed here at TIMED_ROWS rows (the forms take turns, so that a busy moment weighs on
    all of them); True unless MKL is faster by more than MKL_MARGIN; False where oneDNN is
    missing, rejects the dtype or disagrees with MKL at 1 or TIMED_ROWS rows."""
    if weight.device.type != "cpu" or not onednn_available():
        return False
    try:
        packed = pack_weight(weight)
        w_t = weight.t().contiguous()
        for n in (1, TIMED_ROWS):
            x = torch.randn(n, weight.shape[1], dtype=weight.dtype)
            torch.testing.assert_close(onednn_linear(x, packed, None), row_form(x, w_t, None), rtol=1e-2, atol=1e-2)
        x = torch.randn(TIMED_ROWS, weight.shape[1], dtype=weight.dtype)
        calls = [lambda: onednn_linear(x, packed, None), lambda: row_form(x, w_t, None), lambda: column_form(x, w_t, None)]
        best = [float("inf")] * len(calls)
        for call in calls:
            call()
        for _ in range(repeats):
            for index, call in enumerate(calls):
                started = time.perf_counter()
                call()
                best[index] = min(best[index], time.perf_counter() - started)
    except (RuntimeError, AssertionError):
        return False
    return min(best[1:]) >= MKL_MARGIN * best[0]


class GemmChooser:
    """Runs a packed weight with oneDNN; for a transposed one, picks per (in, out, rows, bias,
    threads) the faster MKL form, measured on the first calls."""

    def __init__(self, *, tune: bool = True) -> None:
        self.tune = tune
        self.choices: dict[tuple[int, int, int, bool, int], str] = {}
        self._trials: dict[tuple[int, int, int, bool, int], dict[str, list[float]]] = {}

    def __call__(self, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(w_t, torch.Tensor):  # a QuantizedLinear (workers/quantized_linear.py)
            return w_t(x, bias)
        if w_t.is_mkldnn:  # a weight packed for oneDNN
            return onednn_linear(x, w_t, bias)
        rows = x.shape[0]
        if not self.tune or rows <= 1 or rows > MAX_TUNED_ROWS or x.device.type != "cpu":
            return row_form(x, w_t, bias)
        key = (w_t.shape[0], w_t.shape[1], rows, bias is not None, torch.get_num_threads())
        choice = self.choices.get(key)
        if choice is not None:
            return FORMS[choice](x, w_t, bias)
        trials = self._trials.setdefault(key, {ROW: [], COLUMN: []})
        form = ROW if len(trials[ROW]) <= len(trials[COLUMN]) else COLUMN
        started = time.perf_counter()
        out = FORMS[form](x, w_t, bias)
        trials[form].append(time.perf_counter() - started)
        if min(len(t) for t in trials.values()) >= TRIALS_PER_FORM:
            self.choices[key] = min(trials, key=lambda f: min(trials[f]))
            del self._trials[key]
        return out
