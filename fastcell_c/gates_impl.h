/* The fused elementwise pass of every cell: gate activations and the state update, one row at a
 * time, with `restrict` pointers so GCC vectorizes them (Cython cannot say restrict, and the LSTM
 * reads too many streams for GCC's run-time alias checks). Blocks of a gate row are S apart
 * (the kernel's stride, fastcell_c/kernel.pyx); biases are folded as docs/SPEC.md allows.
 *
 * A template: gates.h includes it once per element type and x86 level, with
 *   FC_T       float or double
 *   FC_SIG     the sigmoid for FC_T, FC_TANH the tanh (activations.h)
 *   FC_FN(x)   the function name for x at this type and level
 *   FC_ATTR    the level's target attribute
 */

/* h = tanh(g + b) */
FC_ATTR static void FC_FN(rnn_tanh)(ptrdiff_t H, const FC_T *restrict g, const FC_T *restrict b,
                                    FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++)
        h[k] = FC_TANH(g[k] + b[k]);
}

/* h = relu(g + b); NaN passes through, as in torch.relu. */
FC_ATTR static void FC_FN(rnn_relu)(ptrdiff_t H, const FC_T *restrict g, const FC_T *restrict b,
                                    FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        FC_T a = g[k] + b[k];
        h[k] = a < 0 ? 0 : a;
    }
}

/* Reset-after GRU. g: input parts of r, z, n; r_h: h W_hh^T of r, z, n; b: folded r, z biases and
 * b_in; b_hn stays inside r * (W_hn h + b_hn). */
FC_ATTR static void FC_FN(gru_reset_after)(ptrdiff_t H, ptrdiff_t S, const FC_T *restrict g,
                                           const FC_T *restrict r_h, const FC_T *restrict b,
                                           const FC_T *restrict b_hn, FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        FC_T r = FC_SIG(g[k] + r_h[k] + b[k]);
        FC_T z = FC_SIG(g[S + k] + r_h[S + k] + b[S + k]);
        FC_T n = FC_TANH(g[2 * S + k] + b[2 * S + k] + r * (r_h[2 * S + k] + b_hn[k]));
        h[k] = n + z * (h[k] - n);
    }
}

/* Reset-before GRU, first pass: leaves z in g's z block and r * h in rh. */
FC_ATTR static void FC_FN(gru_reset_before_gates)(ptrdiff_t H, ptrdiff_t S, FC_T *restrict g,
                                                  const FC_T *restrict b, const FC_T *restrict h,
                                                  FC_T *restrict rh)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        rh[k] = FC_SIG(g[k] + b[k]) * h[k];
        g[S + k] = FC_SIG(g[S + k] + b[S + k]);
    }
}

/* Reset-before GRU, second pass, once g's n block holds W_in x + W_hn (r * h). */
FC_ATTR static void FC_FN(gru_reset_before_update)(ptrdiff_t H, ptrdiff_t S,
                                                   const FC_T *restrict g, const FC_T *restrict b,
                                                   FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        FC_T z = g[S + k];
        FC_T n = FC_TANH(g[2 * S + k] + b[2 * S + k]);
        h[k] = n + z * (h[k] - n);
    }
}

/* LSTM: g holds the pre-activations i, f, g, o without bias; c is updated in place. */
FC_ATTR static void FC_FN(lstm_gates)(ptrdiff_t H, ptrdiff_t S, const FC_T *restrict g,
                                      const FC_T *restrict b, FC_T *restrict c, FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        FC_T i = FC_SIG(g[k] + b[k]);
        FC_T f = FC_SIG(g[S + k] + b[S + k]);
        FC_T z = FC_TANH(g[2 * S + k] + b[2 * S + k]);
        FC_T o = FC_SIG(g[3 * S + k] + b[3 * S + k]);
        FC_T cn = f * c[k] + i * z;
        c[k] = cn;
        h[k] = o * FC_TANH(cn);
    }
}

/* Peephole LSTM: p holds p_i, p_f, p_o, S apart; i and f see c_{t-1}, o sees c_t. */
FC_ATTR static void FC_FN(peephole_gates)(ptrdiff_t H, ptrdiff_t S, const FC_T *restrict g,
                                          const FC_T *restrict b, const FC_T *restrict p,
                                          FC_T *restrict c, FC_T *restrict h)
{
    for (ptrdiff_t k = 0; k < H; k++) {
        FC_T i = FC_SIG(g[k] + b[k] + p[k] * c[k]);
        FC_T f = FC_SIG(g[S + k] + b[S + k] + p[S + k] * c[k]);
        FC_T z = FC_TANH(g[2 * S + k] + b[2 * S + k]);
        FC_T cn = f * c[k] + i * z;
        FC_T o = FC_SIG(g[3 * S + k] + b[3 * S + k] + p[2 * S + k] * cn);
        c[k] = cn;
        h[k] = o * FC_TANH(cn);
    }
}
