# The benchmark floor: T steps of the bare recurrent product y += h W^T and nothing else (no input
# projection, no gates, no output copy). Any recurrent kernel must do at least this per step, so
# the benchmark reports a cell's step time over this one's (bench/, docs/DESIGN.md "Measuring").
from cython cimport floating

from fastcell_c.blas cimport matmul_wt


cdef void floor_run(Py_ssize_t T, int B, int N, int H, const floating* w, const floating* h,
                    floating* y) noexcept nogil:
    cdef Py_ssize_t s
    for s in range(T):
        # y += h @ w.T: GEMV for B = 1, GEMM for B > 1, beta = 1 as in the cell kernels. h is
        # left unchanged, so every step reads the same state: only the product's cost is timed.
        matmul_wt(B, N, H, h, H, w, H, 1, y, N)


def blas_floor(const floating[:, ::1] weight_hh, const floating[:, ::1] h,
               floating[:, ::1] y, Py_ssize_t steps):
    """Runs `steps` bare recurrent products y += h @ weight_hh.T in one nogil block.

    weight_hh (G*H, H) row-major, h (B, H), y (B, G*H) accumulated in place (beta = 1).
    Divide the time by `steps` for the per-step floor of a cell with G gates.
    """
    cdef Py_ssize_t N = weight_hh.shape[0]
    cdef Py_ssize_t H = weight_hh.shape[1]
    cdef Py_ssize_t B = h.shape[0]
    if h.shape[1] != H:
        raise ValueError(f"h: expected shape ({B}, {H}), got ({B}, {h.shape[1]})")
    if y.shape[0] != B or y.shape[1] != N:
        raise ValueError(f"y: expected shape ({B}, {N}), got ({y.shape[0]}, {y.shape[1]})")
    if steps < 0:
        raise ValueError(f"steps: expected >= 0, got {steps}")
    if B >= 2 ** 31 or N >= 2 ** 31 or H >= 2 ** 31:
        raise ValueError(f"too large for BLAS: B={B}, G*H={N}, H={H}")
    if steps == 0 or B == 0 or N == 0 or H == 0:
        return
    with nogil:
        floor_run(steps, <int>B, <int>N, <int>H, &weight_hh[0, 0], &h[0, 0], &y[0, 0])
