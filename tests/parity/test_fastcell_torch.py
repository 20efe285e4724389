"""fastcell.torch, the PyTorch peephole LSTM one trains (and the PyTorch reference of the peephole
cell, tests/torch_reference.py): its parameters' names, shapes and initialisation, its shapes like
torch.nn.LSTM's, its errors, its equations (fastcell.reference.lstm_cell), training, packed
sequences; and fastcell.PeepholeLSTM / PeepholeLSTMCell against it, within docs/SPEC.md's
tolerance, over layers, directions, layouts, lengths, initial states, dtypes and a long sequence."""

import itertools

import numpy as np
import pytest

import fastcell
from fastcell import from_torch
from conftest import TOL, torch_or_skip
from helpers import tensor_max_diff

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning",
                                        "ignore:enable_nested_tensor:UserWarning")

DTYPES = [np.float32, np.float64]


def _fct():
    torch_or_skip()
    import fastcell.torch as fct
    return fct


def test_peephole_parameters_names_shapes_and_init():
    torch = torch_or_skip()
    fct = _fct()
    m = fct.PeepholeLSTM(3, 16, num_layers=2, bidirectional=True)
    names = dict(m.named_parameters())
    expected = fastcell.PeepholeLSTM(3, 16, num_layers=2, bidirectional=True).expected_shapes()
    assert {n: tuple(p.shape) for n, p in names.items()} == expected
    assert list(m.state_dict()) == list(names)
    k = 1 / 4
    for n, p in names.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert float(p.detach().abs().max()) <= k, n
        assert float(p.detach().abs().max()) > k / 2, n  # spread over the range, not zeros
    assert "weight_ph_l1_reverse" in names
    nb = fct.PeepholeLSTM(3, 4, bias=False)
    assert sorted(dict(nb.named_parameters())) == ["weight_hh_l0", "weight_ih_l0", "weight_ph_l0"]
    cell = fct.PeepholeLSTMCell(3, 4)
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == {
        "weight_ih": (16, 3), "weight_hh": (16, 4), "bias_ih": (16,), "bias_hh": (16,), "weight_ph": (3, 4)}
    assert fct.PeepholeLSTM(3, 4, dtype=torch.float64).weight_ph_l0.dtype == torch.float64
    assert "num_layers=2" in repr(m) and "bidirectional=True" in repr(m)


@pytest.mark.parametrize("L,bi,bf", list(itertools.product((1, 2), (False, True), (False, True))))
def test_peephole_shapes(L, bi, bf):
    torch = torch_or_skip()
    fct = _fct()
    D, T, B, I, H = 2 if bi else 1, 7, 3, 4, 5
    m = fct.PeepholeLSTM(I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    x = torch.randn(B, T, I) if bf else torch.randn(T, B, I)
    out, (h, c) = m(x)
    assert out.shape == ((B, T, D * H) if bf else (T, B, D * H))
    assert h.shape == c.shape == (D * L, B, H)
    out, (h, c) = m(torch.randn(T, I))  # unbatched: (T, I) whatever batch_first
    assert out.shape == (T, D * H) and h.shape == c.shape == (D * L, H)
    out2, _ = m(torch.randn(T, I), (h, c))
    assert out2.shape == (T, D * H)
    ref = torch.nn.LSTM(I, H, num_layers=L, bidirectional=bi, batch_first=bf)
    assert [t.shape for t in m(x)[1]] == [t.shape for t in ref(x)[1]]
    assert m(x)[0].shape == ref(x)[0].shape


def test_peephole_bad_arguments():
    torch = torch_or_skip()
    fct = _fct()
    m = fct.PeepholeLSTM(4, 5, num_layers=2)
    with pytest.raises(ValueError, match="input.size"):
        m(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        m(torch.randn(4))
    with pytest.raises(ValueError, match=r"h_0: expected shape \(2, 2, 5\), got \(1, 2, 5\)"):
        m(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(2, 2, 5)))
    with pytest.raises(TypeError, match="an \\(h_0, c_0\\) pair"):
        m(torch.randn(3, 2, 4), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="hidden_size"):
        fct.PeepholeLSTM(4, 0)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\)"):
        fct.PeepholeLSTMCell(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5), torch.zeros(5)))


def test_peephole_cell_matches_layer_step():
    torch = torch_or_skip()
    fct = _fct()
    torch.manual_seed(0)
    layer, cell = fct.PeepholeLSTM(3, 4), fct.PeepholeLSTMCell(3, 4)
    cell.load_state_dict({n[:-3]: p for n, p in layer.state_dict().items()})
    x, h0, c0 = torch.randn(5, 2, 3), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        out, (h, c) = layer(x, (h0[None], c0[None]))
        s = (h0, c0)
        for t in range(5):
            s = cell(x[t], s)
            # Both sides are PyTorch's matmuls, (T*B, I) against (B, I): PyTorch does not promise
            # the same bits for the two (its kernels block the sums differently on different
            # CPUs), so float32's tolerance, 1e-5.
            assert tensor_max_diff(s[0], out[t]) <= TOL[np.float32]
    assert tensor_max_diff(s[0], h[0]) <= TOL[np.float32] and tensor_max_diff(s[1], c[0]) <= TOL[np.float32]
    hu, cu = cell(x[0, 0])  # unbatched
    assert hu.shape == cu.shape == (4,)


def test_peephole_equations_against_reference():
    """The module computes docs/SPEC.md's equations (fastcell.reference.lstm_cell with weight_ph)."""
    torch = torch_or_skip()
    fct = _fct()
    from fastcell import reference as ref
    torch.manual_seed(1)
    cell = fct.PeepholeLSTMCell(3, 4, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ph.mul_(8)  # peepholes large enough to matter
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    with torch.no_grad():
        got = cell(x, (h, c))
    w = {n: p.detach().numpy() for n, p in cell.named_parameters()}
    want = ref.lstm_cell(x.numpy(), h.numpy(), c.numpy(), **w)
    assert tensor_max_diff(got, want) <= 1e-14


@pytest.mark.parametrize("bias", [True, False])
def test_peephole_training_decreases_loss(bias):
    torch = torch_or_skip()
    fct = _fct()
    torch.manual_seed(0)
    m = fct.PeepholeLSTM(3, 8, num_layers=2, bias=bias, batch_first=True)
    head = torch.nn.Linear(8, 1)
    params = list(m.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=0.02)
    x = torch.randn(16, 10, 3)
    y = x[:, :2, 0].sum(1, keepdim=True)  # remember the first two inputs of channel 0
    losses = []
    for _ in range(40):
        out, _ = m(x)
        loss = torch.nn.functional.mse_loss(head(out[:, -1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_peephole_packed_sequence_round_trip():
    torch = torch_or_skip()
    fct = _fct()
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
    torch.manual_seed(0)
    m = fct.PeepholeLSTM(3, 4, bidirectional=True)
    x, lengths = torch.randn(6, 4, 3), torch.tensor([2, 6, 1, 4])
    for enforce_sorted in (False, True):
        lens = lengths if not enforce_sorted else lengths.sort(descending=True).values
        packed = pack_padded_sequence(x, lens, enforce_sorted=enforce_sorted)
        out, (h, c) = m(packed)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert (out.sorted_indices is None) == enforce_sorted
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lens)
        assert padded.shape == (6, 4, 8) and h.shape == (2, 4, 4)
        # each sequence alone gives the same numbers, within float32's tolerance (PyTorch
        # computes both, with matmuls of other shapes: no promise of the same bits)
        for b in range(4):
            n = int(lens[b])
            alone, (hb, cb) = m(x[:n, b])
            assert tensor_max_diff(padded[:n, b], alone) <= TOL[np.float32]
            assert torch.all(padded[n:, b] == 0)
            assert tensor_max_diff(h[:, b], hb) <= TOL[np.float32] and tensor_max_diff(c[:, b], cb) <= TOL[np.float32]


# ---- parity: fastcell.PeepholeLSTM against fastcell.torch.PeepholeLSTM ----

PARITY = list(itertools.product((1, 2, 3), (False, True), (False, True), ("full", "lengths", "unbatched"),
                                ("zeros", "given"), DTYPES))


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,mode,hx,dtype", PARITY)
def test_peephole_layer_parity(num_layers, bidirectional, batch_first, mode, hx, dtype, rng):
    torch = torch_or_skip()
    fct = _fct()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(int(rng.integers(2**31)))
    I, H, T, B = 3, 6, 9, 5
    D = 2 if bidirectional else 1
    m = fct.PeepholeLSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, dtype=tdt)
    layer = fastcell.PeepholeLSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, dtype=dtype)
    layer.load_state_dict(m.state_dict())
    assert from_torch(m).config() == layer.config()

    unbatched = mode == "unbatched"
    xshape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = rng.standard_normal(xshape).astype(dtype)
    sshape = (D * num_layers, H) if unbatched else (D * num_layers, B, H)
    state = None
    if hx == "given":
        state = (rng.standard_normal(sshape).astype(dtype), rng.standard_normal(sshape).astype(dtype))
    tstate = None if state is None else tuple(torch.from_numpy(s) for s in state)

    with torch.no_grad():
        if mode == "lengths":
            lengths = rng.integers(1, T + 1, size=B)
            lengths[rng.choice(B, 2, replace=False)] = [1, T]  # unsorted, with 1 and the full length
            packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                          batch_first=batch_first, enforce_sorted=False)
            out, (h, c) = m(packed, tstate)
            want_out, _ = pad_packed_sequence(out, batch_first=batch_first)
            got_out, (gh, gc) = layer(x, state, lengths=lengths)
        else:
            want_out, (h, c) = m(torch.from_numpy(x), tstate)
            got_out, (gh, gc) = layer(x, state)
    assert got_out.shape == tuple(want_out.shape)
    assert gh.shape == tuple(h.shape) and gc.shape == tuple(c.shape)
    assert tensor_max_diff((got_out, gh, gc), (want_out, h, c)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peephole_parity_long_sequence(dtype, rng):
    """docs/SPEC.md's contract holds over T = 1000 with PyTorch's initialisation and unit inputs."""
    torch = torch_or_skip()
    fct = _fct()
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(3)
    m = fct.PeepholeLSTM(4, 16, bidirectional=True, dtype=tdt)
    layer = from_torch(m)
    x = rng.standard_normal((1000, 2, 4)).astype(dtype)
    with torch.no_grad():
        want = m(torch.from_numpy(x))
    assert tensor_max_diff(layer(x), want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peephole_cell_parity(dtype, rng):
    torch = torch_or_skip()
    fct = _fct()
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(4)
    m = fct.PeepholeLSTMCell(3, 7, dtype=tdt)
    cell = from_torch(m)
    assert isinstance(cell, fastcell.PeepholeLSTMCell)
    x = rng.standard_normal((20, 2, 3)).astype(dtype)
    s, ts = None, None
    with torch.no_grad():
        for t in range(20):
            s = cell(x[t], s)
            ts = m(torch.from_numpy(x[t]), ts)
    assert tensor_max_diff(s, ts) <= TOL[dtype]
