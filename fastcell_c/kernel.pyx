# The base of every cell kernel (rnn.pyx, gru.pyx, lstm.pyx): checks of the buffers a call passes
# in, the workspace, and the GIL-free call of the subclass's walk. A subclass lays out its extra
# weights in __init__ and implements workspace() and run_walk().
cimport numpy as cnp
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.limits cimport INT_MAX
from libc.stdint cimport int8_t, int32_t, int64_t
from libc.stdlib cimport free
from libc.string cimport memset

import numpy as np

from fastcell_c.blas cimport SMALL_M
from fastcell_c.packed cimport (FC_FMT_BF16, FC_FMT_F32, FC_FMT_F64, FC_FMT_I8, FC_I8_MAX_ROWS,
                                FC_I8_MC, FC_LANES, fc_mat)
from fastcell_c.platform cimport cols_for, i8_work_bytes, mm_for, pack_rows
from fastcell_c.team cimport Team
from fastcell_c.walk cimport Slice, Walk, make_walk

cnp.import_array()

LANES = FC_LANES  # packed.h: a packed part is a whole number of vectors of this many columns


_REAL_KINDS = "biuf"  # bool, signed, unsigned, float


def to_numpy(value, name):
    """Any array-like (NumPy, nested lists, a CPU torch tensor, even one that requires grad) as an
    ndarray, without importing torch; TypeError naming the argument for anything else."""
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu") and not isinstance(value, np.ndarray):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
    except (ValueError, TypeError, RuntimeError) as exc:  # ragged lists, bfloat16 tensors, ...
        raise TypeError(f"{name}: expected a real array, got {type(value).__name__} ({exc})") from None
    if arr.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"{name}: expected real numbers, got an array of dtype {arr.dtype}")
    return arr



def as_int(value, name, low=1):
    """A count argument: an integer >= low (not a bool, not a float), as a Python int; else
    TypeError or ValueError naming the argument, what it expects and what came."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    return int(value)


def gate_layout(Py_ssize_t gates, Py_ssize_t hidden_size, Py_ssize_t split_gates=0):
    """(stride, [part widths]) of a gate row: gate block g starts at column g * stride, and the
    blocks [0, split_gates) and the rest (or all, without a split) form packed parts of whole
    vectors of LANES columns.

    A hidden size of at least LANES gets a stride of whole vectors: then any LANES units own
    whole vectors of every gate, so threads can split a step by hidden units on the one packed
    copy (at most 31/16 of the weights, at H = 17). A smaller one is not padded per gate (an LSTM
    of H = 1 would keep 16 times its weights): its gate row is padded whole, and one narrower
    than a vector not at all. The reset-before GRU's split falls between vectors: stride a
    multiple of LANES / 2."""
    cdef Py_ssize_t n = gates * hidden_size, stride, g0, g1
    if n < LANES:
        stride = hidden_size
    elif hidden_size >= LANES:
        stride = (hidden_size + LANES - 1) // LANES * LANES
    elif split_gates:
        stride = (hidden_size + LANES // 2 - 1) // (LANES // 2) * (LANES // 2)
    else:
        stride = hidden_size
    parts = [(0, split_gates), (split_gates, gates)] if split_gates else [(0, gates)]
    widths = []
    for g0, g1 in parts:
        w = (g1 - g0) * stride
        widths.append(w if n < LANES else (w + LANES - 1) // LANES * LANES)
    return stride, widths


def aligned_zeros(shape, dtype, align=64):
    """Zeros whose data starts on an `align`-byte boundary (NumPy only promises 16): a vector load
    that straddles two cache lines costs two, which halves the kernels' bandwidth from L2."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)

# Weight formats: what the packed matrices hold, the dtype the given weight arrays have, and the
# dtype the kernel computes in. bf16 arrives as its 16-bit patterns.
FORMATS = {"float32": (FC_FMT_F32, np.float32, np.float32), "float64": (FC_FMT_F64, np.float64, np.float64),
           "bf16": (FC_FMT_BF16, np.uint16, np.float32), "int8": (FC_FMT_I8, np.int8, np.float32)}
INT8_MAX_ROWS = FC_I8_MAX_ROWS


# BLAS threads. fastcell serves many streams on many threads, so by default (`_blas_threads` = 1)
# its kernels call no BLAS at all (blas_pays). Given more threads (set_blas_threads, for a batch
# job that owns the machine), large input projections go to BLAS with that many threads, set
# thread-locally around the kernel call through OpenBLAS's openblas_set_num_threads_local and
# restored after: the host's other BLAS use keeps its own setting. Without that symbol (another
# BLAS) this is a no-op and the BLAS's own setting applies.
ctypedef int (*set_local_threads_t)(int) noexcept nogil
cdef set_local_threads_t _set_local_threads = NULL
cdef int _blas_threads = 1


cdef int enter_blas() noexcept nogil:
    """Sets this thread's BLAS thread count for a kernel call; returns the one to restore."""
    if _set_local_threads == NULL:
        return -1
    return _set_local_threads(_blas_threads)


cdef void leave_blas(int previous) noexcept nogil:
    if previous > 0 and _set_local_threads != NULL:
        _set_local_threads(previous)


cdef bint blas_pays(Py_ssize_t rows) noexcept nogil:
    """Whether a projection of this many rows goes to BLAS: only with more than one BLAS thread
    (set_blas_threads), since single-threaded fastcell's own GEMM is as fast (blas.pxd)."""
    return _blas_threads > 1 and rows > SMALL_M


def install_blas_thread_control(size_t address):
    """Called once by fastcell with the address of scipy's openblas_set_num_threads_local."""
    global _set_local_threads
    _set_local_threads = <set_local_threads_t>address


def set_blas_threads(int n):
    """The number of BLAS threads fastcell's BLAS calls use (default 1: then it makes none, see
    blas_pays); returns the old one."""
    global _blas_threads
    if n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n}")
    previous, _blas_threads = _blas_threads, n
    return previous


# A walk splits over a team's threads by rows when each part gets at least ROWS_PER_PART rows
# (independent sub-batches: no barrier), else by hidden units when a step's recurrent product
# has at least UNIT_MIN_MACS multiply-adds (below, the barrier costs more than the split saves).
# (Measured: bench/suites/split_rule.py.) split_rule() reads and sets them, for tuning and for
# the tests, which split small models to check the bits.
cdef Py_ssize_t ROWS_PER_PART = 8
cdef Py_ssize_t UNIT_MIN_MACS = 65536


def split_rule(rows_per_part=None, unit_min_macs=None):
    """The rule by which a call splits over its model's threads, as (rows_per_part,
    unit_min_macs); given values replace the current ones (process-wide) and the previous pair
    is returned. Every split gives the bits of one thread: the rule moves time, never results."""
    global ROWS_PER_PART, UNIT_MIN_MACS
    previous = (ROWS_PER_PART, UNIT_MIN_MACS)
    if rows_per_part is not None:
        ROWS_PER_PART = as_int(rows_per_part, "rows_per_part", 1)
    if unit_min_macs is not None:
        UNIT_MIN_MACS = as_int(unit_min_macs, "unit_min_macs", 0)
    return previous


cdef void balance_rows(const Walk* w, int nparts, Py_ssize_t* bounds) noexcept nogil:
    """Row bounds of nparts parts with about equal steps each: the rows come sorted by length,
    longest first, so equal counts would give part 0 the most work."""
    cdef Py_ssize_t j, total = 0, acc = 0
    cdef int part = 1
    for j in range(w.B):
        total += w.lengths[j]
    bounds[0] = 0
    for j in range(w.B):
        acc += w.lengths[j]
        if part < nparts and acc * nparts >= total * part:
            bounds[part] = j + 1
            part += 1
    while part <= nparts:
        bounds[part] = w.B
        part += 1


cdef void _run_part(void* arg, int part, int nparts) noexcept nogil:
    """One part of a split walk (a team's task)."""
    cdef Job* job = <Job*>arg
    cdef void* k = job.kernel            # borrowed: the caller holds the kernel
    cdef Walk w = job.w
    cdef Py_ssize_t b0, isz = job.isz
    cdef const char* x = job.x
    cdef char* h = job.h
    cdef char* c = job.c
    cdef char* out = job.out
    cdef char* mine = job.priv + part * job.part_bytes
    cdef Slice sl, whole
    if job.mode == ROWS:
        b0 = job.bounds[part]
        w.B = w.n = job.bounds[part + 1] - b0
        if w.B == 0:
            return
        w.lengths += b0                # rows in processing order: x and out by perm
        w.perm += b0
        h += b0 * (<Kernel>k).output_size * isz
        if c != NULL:
            c += b0 * (<Kernel>k).hidden_size * isz
        w.qwork = mine + job.qoff if job.qoff >= 0 else NULL
        (<Kernel>k).run_walk(&w, x, h, c, out, mine)
        return
    slice_of(k, part, nparts, &sl)
    slice_of(k, 0, 1, &whole)
    sl.whole = &whole
    sl.team = job.team
    sl.h_alt = job.h_alt
    sl.xh = mine
    w.qwork = mine + job.qoff if job.qoff >= 0 else NULL
    (<Kernel>k).run_units(&w, x, h, c, out, job.work, &sl)


cdef void _run_call(void* arg, int part, int nparts) noexcept nogil:
    """One direction of a bidirectional layer on its own thread (a team's task)."""
    cdef Call* call = (<Call*>arg) + part
    (<Kernel>call.kernel).run_walk(&call.w, call.x, call.h, call.c, call.out, call.work)


def run_directions(Kernel forward not None, Kernel backward not None, x, states, out,
                   Py_ssize_t out_col, bint batch_first, lengths, perm, Team team not None):
    """Both directions of one bidirectional layer: forward's outputs to out's first columns,
    backward's (which walks x backwards in time) from out_col. states: [h, c or None] of each,
    as Kernel.run takes them. The two walks run at once, a thread each (no barrier at all),
    unless the team has 4 threads or more and a walk would split over them (Kernel.run's plan):
    then each runs split over the whole team in turn. Either way, the bits of one thread."""
    cdef Call calls[2]
    cdef int nparts, ready = 0
    cdef bint paired
    calls[0].work = calls[1].work = NULL
    try:
        ready = forward.prepare(&calls[0], x, states[0], states[1], out, 0, batch_first, False,
                                lengths, perm)
        ready = ready and backward.prepare(&calls[1], x, states[2], states[3], out, out_col,
                                           batch_first, True, lengths, perm)
        if not ready:
            return
        # From 4 threads, a pair would leave threads idle that a split walk uses.
        paired = not (calls[0].w.use_blas or calls[1].w.use_blas) and (
            team.threads < 4
            or forward.plan(calls[0].w.T, calls[0].w.B, team.threads, &nparts) == 0)
        if paired:
            with nogil:
                if team.enter():
                    team.run(_run_call, calls, 2)
                    team.leave()
                else:
                    paired = False
        if not paired:
            forward.finish(&calls[0], team)
            backward.finish(&calls[1], team)
    finally:
        free(calls[0].work)
        free(calls[1].work)


cdef void slice_of(void* kp, int part, int nparts, Slice* sl) noexcept nogil:
    """This part's hidden units (whole vectors of each gate block) and projection outputs."""
    cdef Py_ssize_t v = (<Kernel>kp).stride // FC_LANES, v0 = v * part // nparts
    cdef Py_ssize_t v1 = v * (part + 1) // nparts
    sl.part, sl.nparts = part, nparts
    sl.u0 = <int>(v0 * FC_LANES)
    sl.uc = <int>(v1 * FC_LANES)
    sl.u1 = <int>min(sl.uc, (<Kernel>kp).hidden_size)
    sl.p0 = sl.p1 = sl.pc = 0
    cdef Py_ssize_t P = (<Kernel>kp).proj_outputs(), q
    if P >= FC_LANES:
        q = (P + FC_LANES - 1) // FC_LANES
        sl.p0 = <int>(q * part // nparts * FC_LANES)
        sl.pc = <int>(q * (part + 1) // nparts * FC_LANES)
        sl.p1 = <int>min(sl.pc, P)
    elif P > 0 and part == 0:      # a projection narrower than a vector: part 0 makes it all
        sl.p1 = sl.pc = <int>P


def blas_thread_control_installed():
    return _set_local_threads != NULL


cdef char* buffer_of(object a, str name, int typenum, tuple shape, bint writable) except NULL:
    """The data pointer of a C-contiguous ndarray of the given dtype (native byte order) and
    shape, else ValueError."""
    if (not is_array(a, typenum, len(shape)) or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            or tuple(a.shape) != shape):
        got = f"{type(a).__name__}" if not isinstance(a, np.ndarray) else (
            f"{a.dtype} array of shape {a.shape}{'' if a.flags.c_contiguous else ', not C-contiguous'}")
        raise ValueError(f"{name}: expected a C-contiguous {np.dtype(np.float64 if typenum == cnp.NPY_DOUBLE else np.float32)} "
                         f"array of shape {shape}, got {got}")
    if writable and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        raise ValueError(f"{name}: expected a writable array")
    return <char*>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class Kernel:
    def __init__(self, weight_ih, weight_hh, bias, Py_ssize_t hidden_size, Py_ssize_t gates,
                 Py_ssize_t split_gates=0, str weight_format="float32", scale_ih=None,
                 scale_hh=None, int input_bits=16):
        """weight_ih (gates*H, I), weight_hh (gates*H, H_out): PyTorch's layout (gate blocks of
        H rows), C-contiguous, in the dtype of weight_format (FORMATS; bf16 as its 16-bit
        patterns); int8 adds the per-row weight scales scale_ih, scale_hh (gates*H,) float32 and
        quantizes x to input_bits (8 or 16) and h to 8 bits per row (products_int8.h). bias
        (gates*H,): what every gate row adds, in the compute dtype.

        The kernel keeps only its packed copy (products.h): a gate row has `width` columns, gate
        block g at column g * stride; split_gates > 0: the first split_gates blocks and the rest
        are packed apart (a cell that multiplies them separately). unpack() gives the weights
        back. Padding: each packed part is a whole number of vectors (FC_LANES columns); a
        matrix of fewer columns than that is packed unpadded (the narrow products)."""
        if weight_format not in FORMATS:
            raise ValueError(f"weight_format: expected one of {', '.join(FORMATS)}, got {weight_format!r}")
        self.weight_format = weight_format
        fmt, wdtype, cdtype = FORMATS[weight_format]
        self.dtype = np.dtype(cdtype)
        self.is_double = self.dtype == np.float64
        self.blas_ok = fmt in (FC_FMT_F32, FC_FMT_F64)
        self.hidden_size = hidden_size
        self.gates = gates
        self.input_size = weight_ih.shape[1]
        self.output_size = weight_hh.shape[1]
        self.ks = self.input_size + self.output_size
        self._arrays = []
        self._packings = [None, None]
        self.stride, widths = gate_layout(gates, hidden_size, split_gates)
        parts = [(0, split_gates), (split_gates, gates)] if split_gates else [(0, gates)]
        self.width = self._pack(self.mats, 0, [(weight_ih, scale_ih, input_bits),
                                               (weight_hh, scale_hh, 8)],
                                hidden_size, self.stride, [p + (w,) for p, w in zip(parts, widths)])
        self.split = self._packings[0]["parts"][0][3]      # the first part's width
        self.bias = self._keep(self.laid_out(bias, gates), "bias", (self.width,))

    def __dealloc__(self):
        cdef int slot
        for slot in range(2):
            free(self._owned[slot])

    def __reduce__(self):
        # Cython's automatic pickling would store the weight pointers as NUL-terminated bytes and
        # restore dangling pointers. Models pickle their weights and rebuild their kernels.
        raise TypeError(f"cannot pickle {type(self).__name__}: pickle the model instead")

    cdef const char* _keep(self, object a, str name, tuple shape) except NULL:
        cdef const char* p = buffer_of(a, name, cnp.NPY_DOUBLE if self.is_double else cnp.NPY_FLOAT,
                                       shape, False)
        self._arrays.append(a)
        return p

    def laid_out(self, v, Py_ssize_t blocks, Py_ssize_t width=-1):
        """A per-unit vector of `blocks` gate blocks of hidden_size values ((blocks * H,) or
        (rows, blocks * H)) laid out as a gate row: block g at column g * stride, zeros between
        (width: the row's, default the kernel's), in the compute dtype, 64-byte aligned."""
        v = np.asarray(v, dtype=self.dtype)
        H, S = self.hidden_size, self.stride
        lead = v.shape[:v.ndim - 1]
        out = aligned_zeros(lead + ((self.width if width < 0 else width),), self.dtype)
        for g in range(blocks):
            out[..., g * S:g * S + H] = v[..., g * H:(g + 1) * H]
        return out

    cdef Py_ssize_t _pack(self, fc_mat* mats, int slot, list segments, Py_ssize_t rows_per_gate,
                          Py_ssize_t stride, list parts) except -1:
        """Packs the segments [(W (gates * rows_per_gate, k_s) in PyTorch's layout and the
        weight format, int8 per-row scales or None, int8 activation bits), ...] stacked (rows
        of a packed matrix: the segments' inputs one after another), into one packed matrix per
        part (gate blocks [g0, g1) of `parts`, with its width: gate_layout), owned by the kernel
        in `slot` (0: W_ih over W_hh, 1: W_hr). Gate block g of a part starts at column
        (g - g0) * stride. Returns the width (all parts). bf16 packs each segment in row pairs, padded to an even row count (products.h);
        int8 in quads, padded to a multiple of 4."""
        fmt, wdtype, _ = FORMATS[self.weight_format]
        cdef int layout = fmt            # the format is the packed layout (packed.h)
        cdef int typenum = {np.float32: cnp.NPY_FLOAT, np.float64: cnp.NPY_DOUBLE,
                            np.uint16: cnp.NPY_USHORT, np.int8: cnp.NPY_BYTE}[wdtype]
        cdef Py_ssize_t itemsize = np.dtype(wdtype).itemsize, ks = 0, K4 = 0, rows, k, g
        cdef Py_ssize_t gates = parts[len(parts) - 1][1], n_rows = gates * rows_per_gate
        cdef Py_ssize_t pad = 2 if fmt == FC_FMT_BF16 else 4 if fmt == FC_FMT_I8 else 1
        cdef list ks_of = [], j0_of = []
        for a, scale, bits in segments:
            buffer_of(a, "weights", typenum, (n_rows, a.shape[1]), False)
            k = a.shape[1]
            if fmt == FC_FMT_I8 and k > FC_I8_MAX_ROWS:
                raise ValueError(f"weights: int8 products take at most {FC_I8_MAX_ROWS} inputs per "
                                 f"weight matrix (an int32 sum must not overflow), got {k}")
            ks_of.append(k)
            j0_of.append(ks)
            ks += (k + pad - 1) // pad * pad   # every segment starts on a pair (bf16) or quad (int8)
        part_list, c = [], 0
        for g0, g1, w in parts:
            part_list.append((g0, g1, c, w))
            c += w
        cdef Py_ssize_t n = c
        cdef Py_ssize_t nbytes = ks * n * itemsize
        cdef char* wp = alloc_aligned(nbytes)
        if wp == NULL:
            raise MemoryError(f"packed weights of {ks} x {n}")
        memset(wp, 0, nbytes)          # the padding stays zero
        free(self._owned[slot])
        self._owned[slot] = wp
        self.packed_bytes = nbytes if slot == 0 else self.packed_bytes + nbytes
        cdef Py_ssize_t c0, pw, part, si
        cdef char* pwp
        cdef cnp.ndarray src
        scales = []
        for part in range(len(part_list)):
            g0, g1, c0, pw = part_list[part]
            pwp = wp + ks * c0 * itemsize
            mats[part].fmt = fmt
            mats[part].ks = <int>ks
            mats[part].seg0 = ks_of[0]
            mats[part].seg0p = j0_of[1] if len(segments) > 1 else ks
            mats[part].wp = pwp
            mats[part].n = <int>pw
            mats[part].mm = mm_for(fmt)
            mats[part].cols = cols_for(fmt)
            for si in range(len(segments)):
                src = segments[si][0]
                k = ks_of[si]
                for g in range(g0, g1):
                    pack_rows(layout, 0, <char*>cnp.PyArray_DATA(src) + g * rows_per_gate * k * itemsize,
                                 k, <int>rows_per_gate, <int>k, pwp, <int>pw, <int>ks,
                                 <int>j0_of[si], <int>((g - g0) * stride))
            if fmt == FC_FMT_I8:
                scales.append(self._int8_part(&mats[part], segments, ks_of, j0_of, g0, g1, pw,
                                              rows_per_gate, stride, <const int8_t*>pwp))
        # What unpack() needs to find every weight again.
        self._packings[slot] = {"layout": layout, "ks_of": ks_of, "j0_of": j0_of,
                                "parts": part_list, "rows": rows_per_gate, "stride": stride,
                                "ks": ks, "itemsize": itemsize, "scales": scales}
        return n

    cdef list _int8_part(self, fc_mat* m, list segments, list ks_of, list j0_of, Py_ssize_t g0,
                         Py_ssize_t g1, Py_ssize_t pw, Py_ssize_t rows_per_gate,
                         Py_ssize_t stride, const int8_t* wp):
        """The int8 fields of one part: segment sizes, activation bits, and its columns' scales
        and column sums (kept alive by the kernel). Returns the scales, which unpack() reads."""
        cdef int si
        cdef Py_ssize_t g, R = rows_per_gate
        out = []
        m.i8.nseg = len(segments)
        m.i8.n = <int>pw
        m.i8.wp = wp
        for si in range(m.i8.nseg):
            a, scale, bits = segments[si]
            if bits not in (8, 16):
                raise ValueError(f"input_bits: expected 8 or 16, got {bits}")
            if scale is None:
                raise ValueError("int8 weights need their per-row scales")
            sc = aligned_zeros((pw,), np.float32)
            cs = aligned_zeros((pw,), np.int32)
            sums = np.asarray(a).sum(axis=1, dtype=np.int32)
            scale = np.asarray(scale, dtype=np.float32)
            for g in range(g0, g1):
                sc[(g - g0) * stride:(g - g0) * stride + R] = scale[g * R:(g + 1) * R]
                cs[(g - g0) * stride:(g - g0) * stride + R] = sums[g * R:(g + 1) * R]
            self._arrays += [sc, cs]
            out.append(sc)
            m.i8.rows[si] = ks_of[si]
            m.i8.k4[si] = (ks_of[si] + 3) // 4 * 4
            m.i8.bits[si] = bits
            m.i8.scale[si] = <const float*>cnp.PyArray_DATA(<cnp.ndarray>sc)
            m.i8.colsum[si] = <const int32_t*>cnp.PyArray_DATA(<cnp.ndarray>cs)
        cdef long q = i8_work_bytes(&m.i8, FC_I8_MC)
        cdef Py_ssize_t elems = (q + 64) // 4 + 1
        self.q_elems = max(self.q_elems, elems)
        return out

    def unpack(self, int slot=0, int segment=0):
        """The weights of one packed segment as they were given: slot 0, segment 0 W_ih, segment
        1 W_hh; slot 1 W_hr. (W (gates * rows, k) in the weight format's dtype, int8's per-row
        scales or None): new arrays, computed now (the kernel keeps the packed copy only)."""
        if not 0 <= slot < 2 or self._packings[slot] is None:
            raise ValueError(f"slot: this kernel packs nothing in slot {slot}")
        info = self._packings[slot]
        ks_of = info["ks_of"]
        if not 0 <= segment < len(ks_of):
            raise ValueError(f"segment: expected 0 to {len(ks_of) - 1}, got {segment}")
        cdef Py_ssize_t R = info["rows"], stride = info["stride"], g0, g1, c0, pw
        cdef Py_ssize_t k = ks_of[segment], g, part, itemsize = info["itemsize"]
        cdef Py_ssize_t gates = info["parts"][len(info["parts"]) - 1][1]
        out = np.empty((gates * R, k), FORMATS[self.weight_format][1])
        int8 = info["layout"] == FC_FMT_I8
        scale = np.empty(gates * R, np.float32) if int8 else None
        cdef const fc_mat* mats = &self.mats[0] if slot == 0 else &self.extra[0]
        for part in range(len(info["parts"])):
            g0, g1, c0, pw = info["parts"][part]
            for g in range(g0, g1):
                pack_rows(info["layout"], 1,
                             <char*>cnp.PyArray_DATA(<cnp.ndarray>out) + g * R * k * itemsize,
                             k, <int>R, <int>k, <void*>mats[part].wp, <int>pw, <int>info["ks"],
                             <int>info["j0_of"][segment], <int>((g - g0) * stride))
                if int8:
                    sc = info["scales"][part][segment]
                    scale[g * R:(g + 1) * R] = sc[(g - g0) * stride:(g - g0) * stride + R]
        return out, scale

    @property
    def resident_bytes(self):
        """Bytes the kernel keeps: its packed matrices and the arrays it points into."""
        return self.packed_bytes + sum(a.nbytes for a in self._arrays)

    cdef Py_ssize_t workspace(self, Py_ssize_t T, Py_ssize_t B, bint packed):
        """Elements of scratch memory a walk over T steps of B rows needs: G, then (after a
        subclass's own buffers) the packing space of lengths or a fused step's [x h] rows."""
        return T * B * self.width + max(T * B * self.input_size if packed else 0, B * self.ks)

    cdef Py_ssize_t work_elems(self, Py_ssize_t T, Py_ssize_t B, bint packed):
        """All the scratch a walk needs: workspace() and, after it, the int8 products' own."""
        return self.workspace(T, B, packed) + self.q_elems

    cdef void* qwork_of(self, char* work, Py_ssize_t T, Py_ssize_t B, bint packed) noexcept:
        """Where the int8 products' scratch starts in a work_elems(T, B, packed) buffer: after
        workspace(), on a cache line."""
        if self.q_elems == 0:
            return NULL
        cdef size_t p = <size_t>(work + self.workspace(T, B, packed) * (8 if self.is_double else 4))
        return <void*>((p + 63) & ~(<size_t>63))

    cdef void run_walk(self, Walk* w, const char* x, char* h, char* c, char* out,
                       char* work) noexcept nogil:
        pass

    cdef void run_units(self, Walk* w, const char* x, char* h, char* c, char* out, char* work,
                        Slice* sl) noexcept nogil:
        pass

    cdef Py_ssize_t proj_outputs(self) noexcept nogil:
        """The outputs of a projection after the gates (LSTMP's P), 0 without one."""
        return 0

    # -- threads (docs/DESIGN.md "Threads") --

    cdef int plan(self, Py_ssize_t T, Py_ssize_t B, int threads, int* nparts) noexcept:
        """How a walk of B rows splits over at most `threads` parts: ROWS (each part its own
        rows, no barrier), UNITS (each part its hidden units, a barrier a step) or 0 (one part),
        with the number of parts."""
        nparts[0] = <int>min(threads, B // ROWS_PER_PART)
        if nparts[0] >= 2:
            return ROWS
        nparts[0] = self.unit_parts(B, threads)
        if nparts[0] >= 2:
            return UNITS
        nparts[0] = 1
        return 0

    cdef int unit_parts(self, Py_ssize_t B, int threads) noexcept nogil:
        """The parts of a split by hidden units of B rows' step where it pays (whole vectors of
        units each, a step's product of at least UNIT_MIN_MACS multiply-adds), else 0."""
        cdef Py_ssize_t vectors = self.stride // FC_LANES if self.hidden_size >= FC_LANES else 0
        cdef Py_ssize_t macs = self.gates * self.hidden_size * self.output_size
        cdef int n = <int>min(threads, vectors)
        return n if n >= 2 and macs * B >= UNIT_MIN_MACS else 0

    cdef int units_layout(self, Py_ssize_t T, Py_ssize_t B, bint packed, int nparts,
                          UnitsLayout* lay) except -1:
        """Lays out and allocates (lay.buf) the buffer of a walk of T steps of B rows (at most)
        split by hidden units over at most nparts parts: the shared workspace and h's second
        buffer, then each part's own region ([x h] rows and the int8 scratch)."""
        cdef Py_ssize_t isz = 8 if self.is_double else 4
        cdef Py_ssize_t ws = self.workspace(T, B, packed) * isz
        lay.h_alt = ws
        lay.shared = (ws + B * self.output_size * isz + 63) // 64 * 64
        lay.part_bytes = ((B * self.ks + self.q_elems) * isz + 127) // 64 * 64
        lay.qoff = (B * self.ks * isz + 63) // 64 * 64 if self.q_elems else -1
        lay.buf = alloc_aligned(lay.shared + nparts * lay.part_bytes)
        if lay.buf == NULL:
            raise MemoryError(f"workspace of {nparts} threads for T={T}, B={B}")
        return 0

    cdef void run_units_in(self, Walk* w, const char* x, char* h, char* c, char* out,
                           const UnitsLayout* lay, Team team, int nparts) noexcept nogil:
        """A walk (at most the layout's T and B) split by hidden units over nparts parts of a
        team its caller holds, in a buffer laid out by units_layout."""
        cdef Job job
        job.w = w[0]
        job.x, job.h, job.c, job.out = x, h, c, out
        job.kernel = <void*>self
        job.mode = UNITS
        job.isz = 8 if self.is_double else 4
        job.work = lay.buf
        job.h_alt = lay.buf + lay.h_alt
        job.priv = lay.buf + lay.shared
        job.part_bytes = lay.part_bytes
        job.qoff = lay.qoff
        job.team = team._t
        team.run(_run_part, &job, nparts)

    cdef int run_parts(self, Walk* w, const char* x, char* h, char* c, char* out,
                       Team team) except -1:
        """Runs the walk split over the team's threads when that pays (plan) and the team is
        free; returns 0 when the caller should run it on its own thread instead."""
        cdef int nparts, mode = self.plan(w.T, w.B, team.threads, &nparts)
        if mode == 0:
            return 0
        cdef bint ran = False
        cdef UnitsLayout lay
        if mode == UNITS:
            self.units_layout(w.T, w.B, w.lengths != NULL, nparts, &lay)
            with nogil:
                if team.enter():
                    self.run_units_in(w, x, h, c, out, &lay, team, nparts)
                    team.leave()
                    ran = True
            free(lay.buf)
            return 1 if ran else 0
        cdef Job job
        cdef Py_ssize_t isz = 8 if self.is_double else 4, part, bmax
        job.w = w[0]
        job.x, job.h, job.c, job.out = x, h, c, out
        job.kernel = <void*>self
        job.mode = ROWS
        job.isz = isz
        job.h_alt = NULL
        rows = None
        if w.lengths == NULL:
            # A part's rows are not contiguous in a time-major x: its walk takes them as a
            # packed batch of full lengths (the same sums: the bits of the whole walk).
            rows = np.empty(2 * w.B, np.int64)
            rows[:w.B] = w.T
            rows[w.B:] = np.arange(w.B)
            job.w.lengths = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>rows)
            job.w.perm = job.w.lengths + w.B
        balance_rows(&job.w, nparts, job.bounds)
        bmax = 0
        for part in range(nparts):
            bmax = max(bmax, job.bounds[part + 1] - job.bounds[part])
        job.part_bytes = (self.work_elems(w.T, bmax, True) * isz + 127) // 64 * 64
        job.qoff = <Py_ssize_t>self.qwork_of(NULL, w.T, bmax, True) if self.q_elems else -1
        job.work = job.priv = alloc_aligned(nparts * job.part_bytes)
        if job.work == NULL:
            raise MemoryError(f"workspace of {nparts} threads for T={w.T}, B={w.B}")
        with nogil:
            if team.enter():
                job.team = team._t
                team.run(_run_part, &job, nparts)
                team.leave()
                ran = True
        free(job.work)
        return 1 if ran else 0

    def run(self, x, h, c=None, out=None, Py_ssize_t out_col=0, bint batch_first=False,
            bint reverse=False, lengths=None, perm=None, Team team=None):
        """Runs one direction over x ((T, B, I), or (B, T, I) with batch_first) in one GIL-free call.

        h (B, H_out), c (B, H) (LSTM only): the initial state in processing order, overwritten
        with the final one. out: None, or (T, B, W) ((B, T, W)) whose H_out columns from out_col
        receive the outputs; rows past a sequence's length are left alone. lengths, perm: int64
        (B,), see walk.pxd; lengths non-increasing in [1, T]. team: the threads to split the
        walk over where that pays (plan), if it is free; else this thread alone.
        """
        cdef Call call
        if not self.prepare(&call, x, h, c, out, out_col, batch_first, reverse, lengths, perm):
            return
        try:
            self.finish(&call, team)
        finally:
            free(call.work)

    cdef int prepare(self, Call* call, x, h, c, out, Py_ssize_t out_col, bint batch_first,
                     bint reverse, lengths, perm) except -1:
        """Checks a run's arguments and fills `call` with its walk, pointers and workspace
        (the caller frees call.work); 0 when there is nothing to do (T or B is 0)."""
        # Each check is a few C comparisons when the array is right (has_dims); buffer_of then
        # only runs to name what is wrong.
        cdef int typenum = cnp.NPY_DOUBLE if self.is_double else cnp.NPY_FLOAT
        if not has_dims(x, typenum, 3, -1, -1, self.input_size, False):
            buffer_of(x, "x", typenum, (None, None, self.input_size), False)
        cdef Py_ssize_t d0 = cnp.PyArray_DIM(<cnp.ndarray>x, 0), d1 = cnp.PyArray_DIM(<cnp.ndarray>x, 1)
        cdef Py_ssize_t T = d1 if batch_first else d0
        cdef Py_ssize_t B = d0 if batch_first else d1
        cdef const char* xp = <const char*>cnp.PyArray_DATA(<cnp.ndarray>x)
        if not has_dims(h, typenum, 2, B, self.output_size, 0, True):
            buffer_of(h, "h", typenum, (B, self.output_size), True)
        cdef char* hp = <char*>cnp.PyArray_DATA(<cnp.ndarray>h)
        cdef char* cp = NULL
        if self.has_cell_state:
            if not has_dims(c, typenum, 2, B, self.hidden_size, 0, True):
                buffer_of(c, "c", typenum, (B, self.hidden_size), True)
            cp = <char*>cnp.PyArray_DATA(<cnp.ndarray>c)
        cdef char* op = NULL
        cdef Py_ssize_t width = 0
        if out is not None:
            if not has_dims(out, typenum, 3, d0, d1, -1, True):
                buffer_of(out, "out", typenum, (d0, d1, None), True)
            width = cnp.PyArray_DIM(<cnp.ndarray>out, 2)
            if out_col < 0 or out_col + self.output_size > width:
                raise ValueError(f"out: {self.output_size} columns from {out_col} do not fit in {width}")
            op = <char*>cnp.PyArray_DATA(<cnp.ndarray>out) + out_col * (8 if self.is_double else 4)
        cdef const int64_t* lp = NULL
        cdef const int64_t* pp = NULL
        cdef Py_ssize_t j
        if T * B > INT_MAX or self.width > INT_MAX:
            raise ValueError(f"x: T*B = {T * B} rows is too many for the kernels' 32-bit sizes")
        if lengths is not None:
            if not (is_array(lengths, cnp.NPY_INT64, 1) and is_array(perm, cnp.NPY_INT64, 1)
                    and lengths.shape[0] == B and perm.shape[0] == B):
                raise ValueError(f"lengths, perm: expected C-contiguous int64 arrays of {B} entries")
            lp = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>lengths)
            pp = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>perm)
            for j in range(B):
                if lp[j] < 1 or lp[j] > T or (j > 0 and lp[j] > lp[j - 1]):
                    raise ValueError(f"lengths: expected non-increasing values in [1, {T}]")
                if pp[j] < 0 or pp[j] >= B:
                    raise ValueError(f"perm: expected values in [0, {B})")
        elif perm is not None:
            raise ValueError("perm: only used with lengths")
        if T == 0 or B == 0:
            return 0
        call.w = make_walk(T, B, batch_first, width, lp, pp, reverse)
        cdef Py_ssize_t n = self.work_elems(T, B, lp != NULL)
        if n > PY_SSIZE_T_MAX // 8:
            raise MemoryError(f"workspace of {n} elements for T={T}, B={B}")
        call.work = alloc_aligned(n * (8 if self.is_double else 4))
        if call.work == NULL:
            raise MemoryError(f"workspace of {n} elements for T={T}, B={B}")
        call.w.use_blas = self.blas_ok and blas_pays(T * B)
        call.w.qwork = self.qwork_of(call.work, T, B, lp != NULL)
        call.x, call.h, call.c, call.out = xp, hp, cp, op
        call.kernel = <void*>self
        return 1

    cdef int finish(self, Call* call, Team team) except -1:
        """Runs a prepared call: split over the team where that pays and it is free, else on
        this thread (BLAS's own threads for a projection set_blas_threads gives them)."""
        cdef int previous
        if team is not None and team.threads > 1 and not call.w.use_blas:
            if self.run_parts(&call.w, call.x, call.h, call.c, call.out, team):
                return 0
        with nogil:
            previous = enter_blas() if call.w.use_blas else -1
            self.run_walk(&call.w, call.x, call.h, call.c, call.out, call.work)
            leave_blas(previous)
        return 0
