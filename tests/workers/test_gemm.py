import pytest
import torch

from workers.gemm import (
    COLUMN,
    MAX_TUNED_ROWS,
    ROW,
    TRIALS_PER_FORM,
    GemmChooser,
    column_form,
    onednn_available,
    onednn_is_faster,
    onednn_linear,
    pack_weight,
    row_form,
)


def _weights(rows: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    w_t = torch.randn(96, 160, generator=generator)
    b = torch.randn(160, generator=generator) if bias else None
    return x, w_t, b


def test_both_forms_compute_x_times_w_contiguously() -> None:
    for rows in (1, 5, 16, 200):
        for bias in (False, True):
            x, w_t, b = _weights(rows, bias)
            expected = x.double() @ w_t.double() + (b.double() if b is not None else 0)
            for form in (row_form, column_form):
                out = form(x, w_t, b)
                assert out.shape == (rows, 160) and out.is_contiguous()
                torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_chooser_measures_both_forms_then_keeps_the_faster() -> None:
    chooser = GemmChooser()
    x, w_t, b = _weights(16, True)
    key = (96, 160, 16, True, torch.get_num_threads())
    for call in range(2 * TRIALS_PER_FORM):
        assert key not in chooser.choices, f"decided after {call} calls"
        torch.testing.assert_close(chooser(x, w_t, b), row_form(x, w_t, b), rtol=1e-5, atol=1e-4)
    assert chooser.choices[key] in (ROW, COLUMN)
    # the decision is per row count: 15 rows start their own trials
    chooser(x[:15], w_t, b)
    assert (96, 160, 15, True, torch.get_num_threads()) not in chooser.choices


def test_one_row_and_prefill_sizes_use_the_row_form_untimed() -> None:
    chooser = GemmChooser()
    for rows in (1, MAX_TUNED_ROWS + 1):
        x, w_t, _ = _weights(rows, False)
        for _ in range(2 * TRIALS_PER_FORM):
            torch.testing.assert_close(chooser(x, w_t), row_form(x, w_t, None))
    assert chooser.choices == {} and chooser._trials == {}


def test_disabled_chooser_is_the_row_form() -> None:
    chooser = GemmChooser(tune=False)
    x, w_t, _ = _weights(16, False)
    for _ in range(2 * TRIALS_PER_FORM):
        assert torch.equal(chooser(x, w_t), row_form(x, w_t, None))
    assert chooser.choices == {}


def test_onednn_packed_weights_compute_the_same_and_are_timed_against_mkl() -> None:
    if not onednn_available():
        pytest.skip("this torch has no oneDNN")
    x, w_t, b = _weights(16, True)
    weight = w_t.t().contiguous()  # [out, in], as in the checkpoint
    packed = pack_weight(weight)
    assert packed.is_mkldnn and packed.numel() == weight.numel()
    for out in (onednn_linear(x, packed, b), GemmChooser()(x, packed, b)):
        torch.testing.assert_close(out, row_form(x, w_t, b), rtol=1e-5, atol=1e-4)
    assert isinstance(onednn_is_faster(weight), bool)
    assert onednn_is_faster(weight.half()) in (True, False)  # a dtype oneDNN may reject: no error
