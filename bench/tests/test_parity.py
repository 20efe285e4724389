"""The competitors compute what fastcell computes: PyTorch and ONNX Runtime within 1e-4 of it on
the same weights and inputs, and every int8 and bf16 model within 0.1 of PyTorch's float32 one (a
benchmark against a wrong model is worthless)."""

import numpy as np
import pytest

from bench.models import KINDS
from bench.parity import PARITY_TOL, REDUCED_TOL, check_parity, verify
from bench.scenarios import INPUT8_SCENARIOS, REDUCED_SCENARIOS, SCENARIOS, runners_for


def test_check_parity():
    diffs = check_parity()
    assert all(d <= PARITY_TOL for d in diffs.values())


@pytest.mark.parametrize("kind", KINDS)
def test_benchmarked_calls_agree(kind):
    # The exact callables the suites time, at the smallest shape of each mode.
    seen = set()
    for sc in SCENARIOS:
        if sc.mode in seen:
            continue
        seen.add(sc.mode)
        runners = runners_for(kind, sc)
        want = runners["fastcell"].results()
        for comp in ("pytorch", "onnxruntime"):
            r = runners[comp]
            if r.available:
                got = r.results()
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=PARITY_TOL,
                                               err_msg=f"{comp} {kind} {sc.id} {k}")


@pytest.mark.parametrize("sc", [sc for sc in REDUCED_SCENARIOS if sc.H <= 128],
                         ids=lambda sc: sc.id)
def test_reduced_formats_are_the_same_model(sc):
    # The benchmarked int8 and bf16 calls, against PyTorch's float32 model (bench.parity.verify
    # raises beyond REDUCED_TOL); fastcell's own are always there.
    for kind in sc.kinds:
        _, errors = verify(kind, sc, runners_for(kind, sc))
        assert {"fastcell-int8", "fastcell-bf16"} <= set(errors)
        assert all(e <= REDUCED_TOL for e in errors.values())


@pytest.mark.parametrize("sc", [sc for sc in INPUT8_SCENARIOS if sc.H <= 128], ids=lambda sc: sc.id)
def test_int8_with_8_bit_inputs_is_the_same_model(sc):
    # fastcell.quantize(..., input_bits=8), benchmarked against ONNX Runtime's int8: within
    # REDUCED_TOL of PyTorch's float32 model, and not the model of 16-bit inputs.
    for kind in sc.kinds:
        runners = runners_for(kind, sc)
        _, errors = verify(kind, sc, runners)
        assert {"fastcell-int8", "fastcell-int8x8"} <= set(errors)
        assert all(e <= REDUCED_TOL for e in errors.values())
        assert errors["fastcell-int8x8"] != errors["fastcell-int8"]


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_floor_is_the_recurrent_product(B, dtype):
    from fastcell_c.blas_floor import blas_floor

    rng = np.random.default_rng(B)
    w = rng.standard_normal((12, 5)).astype(dtype)
    h = rng.standard_normal((B, 5)).astype(dtype)
    y = rng.standard_normal((B, 12)).astype(dtype)
    want = y + 3 * h @ w.T
    blas_floor(w, h, y, 3)    # y += h @ w.T, three times (beta = 1)
    np.testing.assert_allclose(y, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    with pytest.raises(ValueError, match="y: expected shape"):
        blas_floor(w, h, np.zeros((B, 11), dtype), 1)
