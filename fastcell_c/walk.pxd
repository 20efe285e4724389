# How a batch of sequences is walked step by step, shared by every cell's sequence kernel:
# the input projection of the whole batch in one GEMM, which rows of the gate buffer a step
# owns, and where each row's output goes.
#
# Without lengths the gate buffer G keeps x's own row order ((T, B) or, batch_first, (B, T)),
# so a step's rows are G[t, 0:B] with a row stride of 1 or T rows, and no input is copied.
# With lengths the rows are first packed in processing order, as PyTorch's PackedSequence:
# processing row j is batch entry perm[j], lengths are non-increasing, so the active rows of a
# step are a prefix 0..n-1 and a finished sequence's state stays in its row untouched.
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from cython cimport floating

from fastcell_c.blas cimport matmul_t
from fastcell_c.packed cimport FC_PANEL_BYTES, fc_mat
from fastcell_c.products cimport matmul_p
from fastcell_c.team cimport meet_at


cdef struct Walk:
    Py_ssize_t T, B
    Py_ssize_t x_ts, x_bs      # row strides of x (and of G without lengths): time, batch
    Py_ssize_t o_ts, o_bs      # element strides of the output: time, batch
    const int64_t* lengths     # NULL: every sequence runs T steps
    const int64_t* perm
    bint reverse
    Py_ssize_t n               # rows active at the current step
    Py_ssize_t g_row           # first G row of the current step
    Py_ssize_t g_ld            # G row stride of the current step, in rows
    Py_ssize_t off             # packed offset of the current step
    bint flip                  # step s takes its panels backward when (s + flip) is odd
    bint use_blas              # the input projection goes to (multi-threaded) BLAS
    void* qwork                # the int8 products' scratch (Kernel.qwork_of)


cdef inline Walk make_walk(Py_ssize_t T, Py_ssize_t B, bint batch_first, Py_ssize_t out_width,
                           const int64_t* lengths, const int64_t* perm,
                           bint reverse) noexcept nogil:
    cdef Walk w
    w.T = T
    w.B = B
    if batch_first:
        w.x_ts, w.x_bs = 1, T
        w.o_ts, w.o_bs = out_width, T * out_width
    else:
        w.x_ts, w.x_bs = B, 1
        w.o_ts, w.o_bs = B * out_width, out_width
    w.lengths = lengths
    w.perm = perm
    w.reverse = reverse
    w.n = B
    w.g_row = 0
    w.g_ld = 1
    w.off = 0
    w.flip = False
    w.use_blas = False
    w.qwork = NULL
    return w


cdef inline Py_ssize_t time_of(const Walk* w, Py_ssize_t s, Py_ssize_t j) noexcept nogil:
    """The time index that processing row j reads at step s."""
    if w.lengths == NULL:
        return w.T - 1 - s if w.reverse else s
    return w.lengths[j] - 1 - s if w.reverse else s


cdef inline Py_ssize_t batch_of(const Walk* w, Py_ssize_t j) noexcept nogil:
    return j if w.perm == NULL else w.perm[j]


cdef inline void blas_panels(int m, int n, int I, const floating* a, const fc_mat* wm,
                             floating* c, int ldc) noexcept nogil:
    """c[m, n] = a[m, I] @ W_ih for one packed matrix of a float format, by BLAS GEMMs that read
    its panels in place (the W_ih rows of a panel: its first I rows, row stride its width): no
    copy of the weights is kept for BLAS."""
    cdef int PW = FC_PANEL_BYTES // sizeof(floating), o = 0, pw
    cdef const floating* wp = <const floating*>wm.wp
    while o < n:
        pw = min(PW, n - o)
        matmul_t(m, pw, I, a, I, wp + <Py_ssize_t>o * wm.ks, pw, False, c + o, ldc)
        o += PW


cdef inline Py_ssize_t live_rows(const Walk* w, const floating* x, int I, floating* xp,
                                 bint pack) noexcept nogil:
    """The rows of x the walk reads (T * B, or with lengths each step's live ones); with lengths
    and `pack`, copies them into xp step by step, the order the projection's G rows take."""
    cdef Py_ssize_t s, j, n = w.B, r = 0
    if w.lengths == NULL:
        return w.T * w.B
    for s in range(w.T):
        while n > 0 and w.lengths[n - 1] <= s:
            n -= 1
        if pack:
            for j in range(n):
                memcpy(xp + (r + j) * I,
                       x + (time_of(w, s, j) * w.x_ts + batch_of(w, j) * w.x_bs) * I,
                       I * sizeof(floating))
        r += n
    return r


cdef inline void project_inputs(Walk* w, const floating* x, int I, const fc_mat* wm, int split,
                                int gates, floating* G, floating* xp) noexcept nogil:
    """G = x @ W_ih^T for every row the walk will read: one GEMM (xp: packing space, lengths only).

    wm: the kernel's packed matrices (W_ih's rows first), wm[1] the columns from `split` on when
    the kernel packs them apart. With w.use_blas (float formats only) BLAS with its threads reads
    the same panels."""
    cdef Py_ssize_t r = live_rows(w, x, I, xp, True)
    cdef const floating* src = x if w.lengths == NULL else xp
    if w.use_blas:
        blas_panels(<int>r, split, I, src, &wm[0], G, gates)
        if split < gates:
            blas_panels(<int>r, gates - split, I, src, &wm[1], G + split, gates)
        return
    matmul_p(<int>r, split, I, src, I, &wm[0], 0, False, G, gates, False, w.qwork)
    if split < gates:
        matmul_p(<int>r, gates - split, I, src, I, &wm[1], 0, False, G + split, gates, False,
                 w.qwork)


cdef inline bint backward(const Walk* w, Py_ssize_t s) noexcept nogil:
    """Whether step s's products take their panels backward: alternate steps alternate, so each
    starts on the weights the previous one left in cache (products.h)."""
    return (s + w.flip) & 1


cdef inline bint fused_step(const Walk* w, const floating* x, int I, const floating* h, int hout,
                            const fc_mat* wm, int width, floating* G, floating* xh) noexcept nogil:
    """A single step (T = 1, no lengths, no BLAS projection): G = [x h] @ [W_ih; W_hh]^T in one
    pass over the stacked packed weights (xh: B * (I + hout) scratch), the same bits as the
    projection followed by the recurrent product. Returns False, having done nothing, for
    anything else."""
    cdef Py_ssize_t j
    cdef int ks = I + hout
    if w.T != 1 or w.lengths != NULL or w.use_blas:
        return False
    for j in range(w.B):       # with T = 1, row j of x is at j * I in either layout
        memcpy(xh + j * ks, x + j * I, I * sizeof(floating))
        memcpy(xh + j * ks + I, h + j * hout, hout * sizeof(floating))
    matmul_p(<int>w.B, width, ks, xh, ks, wm, 0, False, G, width, backward(w, 0), w.qwork)
    return True


cdef inline void begin_step(Walk* w, Py_ssize_t s) noexcept nogil:
    """Sets n, g_row and g_ld for step s; steps are taken in order 0, 1, ..., T-1."""
    if w.lengths == NULL:
        w.g_row = time_of(w, s, 0) * w.x_ts
        w.g_ld = w.x_bs
        return
    if s > 0:
        w.off += w.n
    while w.n > 0 and w.lengths[w.n - 1] <= s:
        w.n -= 1
    w.g_row = w.off
    w.g_ld = 1


cdef inline void write_outputs(const Walk* w, Py_ssize_t s, const floating* h, Py_ssize_t width,
                               floating* out) noexcept nogil:
    """Copies the n state rows of step s to their places in the output."""
    cdef Py_ssize_t j
    if out == NULL:
        return
    for j in range(w.n):
        memcpy(out + time_of(w, s, j) * w.o_ts + batch_of(w, j) * w.o_bs, h + j * width,
               width * sizeof(floating))


cdef inline bint input_products(Walk* w, const floating* x, int I, const floating* h, int hout,
                                const fc_mat* wm, int width, floating* G,
                                floating* xp) noexcept nogil:
    """Before the time loop of a cell whose gates take x W_ih^T + h W_hh^T in one row: a single
    step does its whole product now (fused_step: returns True), anything else projects its
    inputs (project_inputs: returns False, step_product adds h W_hh^T at each step)."""
    if fused_step(w, x, I, h, hout, wm, width, G, xp):
        return True
    project_inputs(w, x, I, wm, width, width, G, xp)
    return False


cdef inline floating* step_product(Walk* w, Py_ssize_t s, bint fused, floating* G, int width,
                                   const floating* h, int hout, const fc_mat* wm, int I,
                                   Py_ssize_t* ldg) noexcept nogil:
    """Begins step s: returns its first gate row (rows *ldg apart), holding x_t W_ih^T + h W_hh^T
    (the recurrent product added here, unless input_products fused it)."""
    begin_step(w, s)
    cdef floating* g = G + w.g_row * width
    ldg[0] = w.g_ld * width
    if not fused:
        matmul_p(<int>w.n, width, hout, h, hout, wm, I, True, g, <int>ldg[0], backward(w, s),
                 w.qwork)
    return g


# ---- a step split by hidden units (docs/DESIGN.md "Threads") ----
# Each part of a team owns some hidden units: every gate block's columns of them (a range of
# whole vectors: the kernel's stride is one), and so its gate pass is its own. It computes its
# columns of every product over the whole previous h, then its units of the new h, which it
# writes to the other h buffer; the parts meet at one barrier a step (two for the cells whose
# step makes two products from each other's results), then swap the buffers. Each output's
# sum is computed whole by its one part, in the order of one thread: the bits of one thread.
# Where the caller's part takes the run over at a barrier (team.h: another part's CPU was
# taken), meet() widens its slice to every unit and the other parts return at once: the walks
# read their slice afresh after each meet.

cdef struct Slice:
    int part, nparts
    int u0, u1          # this part's hidden units
    int uc              # its columns of each gate block: [u0, uc) (uc = stride for the last part)
    int p0, p1, pc      # LSTMP: its outputs of the projection [p0, p1), columns [p0, pc)
    void* team          # the team whose barrier the parts meet at
    void* h_alt         # the second h buffer (B, H_out), shared
    void* xh            # this part's [x h] rows of a single fused step (B, I + H_out)
    const Slice* whole  # the slice of a single part: every unit (a takeover widens to it)


cdef inline int meet(Slice* sl) noexcept nogil:
    """The parts' barrier: 0 to go on; -1 when this part must stop (the caller's part took the
    rest of the run over: write nothing more); 1 when it is that caller's part, whose slice is
    now every unit."""
    cdef int r = meet_at(sl.team, sl.part)
    if r > 0:
        sl.u0, sl.u1, sl.uc = sl.whole.u0, sl.whole.u1, sl.whole.uc
        sl.p0, sl.p1, sl.pc = sl.whole.p0, sl.whole.p1, sl.whole.pc
    return r


cdef inline void cols_product(int m, int gates, int S, const Slice* sl, int k, const floating* a,
                              int lda, const fc_mat* wm, int j0, bint accumulate, floating* c,
                              int ldc, bint backward, void* work) noexcept nogil:
    """c (+)= a @ W over this part's columns of the `gates` gate blocks of wm (block g at
    column g * S): whole vectors of panels in each block."""
    wm.cols(m, gates, S, sl.u0, sl.uc, k, <const void*>a, lda, wm, j0, accumulate, <void*>c, ldc,
            backward, work)


cdef inline int project_own(Walk* w, const floating* x, int I, const fc_mat* wm, int gates0,
                            int gates1, int S, int split, int width, floating* G,
                            floating* xp, Slice* sl) noexcept nogil:
    """project_inputs for this part's columns: of the gates0 blocks of wm[0] and the gates1 of
    wm[1] (from column `split` of a gate row). With lengths, part 0 packs the rows for all.
    -1: this part stops (meet)."""
    cdef Py_ssize_t r = live_rows(w, x, I, xp, sl.part == 0)
    cdef const floating* src = x
    if w.lengths != NULL:
        src = xp
        if meet(sl) < 0:
            return -1
    cols_product(<int>r, gates0, S, sl, I, src, I, &wm[0], 0, False, G, width, False, w.qwork)
    if gates1:
        cols_product(<int>r, gates1, S, sl, I, src, I, &wm[1], 0, False, G + split, width, False,
                     w.qwork)
    return 0


cdef inline int own_inputs(Walk* w, const floating* x, int I, const floating* h, int hout,
                           const fc_mat* wm, int gates, int S, int width, floating* G,
                           floating* xp, Slice* sl) noexcept nogil:
    """input_products for this part's columns (a cell whose gates take x W_ih^T + h W_hh^T in
    one row): a single step fuses [x h] in one product over them (1), else projects x (0);
    -1: this part stops (meet)."""
    cdef Py_ssize_t j
    cdef int ks = I + hout
    cdef floating* xh = <floating*>sl.xh
    if w.T == 1 and w.lengths == NULL:
        for j in range(w.B):
            memcpy(xh + j * ks, x + j * I, I * sizeof(floating))
            memcpy(xh + j * ks + I, h + j * hout, hout * sizeof(floating))
        cols_product(<int>w.B, gates, S, sl, ks, xh, ks, wm, 0, False, G, width, backward(w, 0),
                     w.qwork)
        return 1
    return project_own(w, x, I, wm, gates, 0, S, width, width, G, xp, sl)


cdef inline floating* own_step_product(Walk* w, Py_ssize_t s, bint fused, floating* G,
                                       int gates, int S, int width, const floating* h,
                                       int hout, const fc_mat* wm, int I, Py_ssize_t* ldg,
                                       const Slice* sl) noexcept nogil:
    """step_product for this part's columns."""
    begin_step(w, s)
    cdef floating* g = G + w.g_row * width
    ldg[0] = w.g_ld * width
    if not fused:
        cols_product(<int>w.n, gates, S, sl, hout, h, hout, wm, I, True, g, <int>ldg[0],
                     backward(w, s), w.qwork)
    return g


cdef inline void carry_rows(const Walk* w, const floating* h, floating* h2, int width, int c0,
                            int c1) noexcept nogil:
    """Rows that have ended (lengths: the rows past the step's n) keep their h in both buffers:
    this part's columns [c0, c1) of them."""
    cdef Py_ssize_t j
    for j in range(w.n, w.B):
        memcpy(h2 + j * width + c0, h + j * width + c0, (c1 - c0) * sizeof(floating))


cdef inline void write_own_outputs(const Walk* w, Py_ssize_t s, const floating* h, int width,
                                   int c0, int c1, floating* out) noexcept nogil:
    """write_outputs for the columns [c0, c1) of each row."""
    cdef Py_ssize_t j
    if out == NULL:
        return
    for j in range(w.n):
        memcpy(out + time_of(w, s, j) * w.o_ts + batch_of(w, j) * w.o_bs + c0,
               h + j * width + c0, (c1 - c0) * sizeof(floating))


cdef inline void own_final(const Walk* w, floating* h, const floating* cur, int width, int c0,
                           int c1) noexcept nogil:
    """After the last step: this part's columns of the final h, back in h if they are in the
    other buffer."""
    cdef Py_ssize_t j
    if cur == h:
        return
    for j in range(w.B):
        memcpy(h + j * width + c0, cur + j * width + c0, (c1 - c0) * sizeof(floating))
