"""Linear layers as `x @ w_t` through whichever of two equivalent GEMM forms runs faster here.

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

Both forms give the same result up to float rounding (summation order).
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


class GemmChooser:
    """Picks, per (in, out, rows, bias, threads), the faster form, measured on the first calls."""

    def __init__(self, *, tune: bool = True) -> None:
        self.tune = tune
        self.choices: dict[tuple[int, int, int, bool, int], str] = {}
        self._trials: dict[tuple[int, int, int, bool, int], dict[str, list[float]]] = {}

    def __call__(self, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0]
        if not self.tune or rows <= 1 or rows > MAX_TUNED_ROWS or x.device.type != "cpu":
            return row_form(x, w_t, bias)
        key = (w_t.shape[0], w_t.shape[1], rows, bias is not None, torch.get_num_threads())
        choice = self.choices.get(key)
        if choice is not None:
            return column_form(x, w_t, bias) if choice == COLUMN else row_form(x, w_t, bias)
        trials = self._trials.setdefault(key, {ROW: [], COLUMN: []})
        form = ROW if len(trials[ROW]) <= len(trials[COLUMN]) else COLUMN
        started = time.perf_counter()
        out = row_form(x, w_t, bias) if form == ROW else column_form(x, w_t, bias)
        trials[form].append(time.perf_counter() - started)
        if min(len(t) for t in trials.values()) >= TRIALS_PER_FORM:
            self.choices[key] = min(trials, key=lambda f: min(trials[f]))
            del self._trials[key]
        return out
