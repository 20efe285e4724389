"""fastcell.RNN / GRU / LSTM against torch.nn over the layer options of docs/SPEC.md "Layers", and
what they share with torch.nn: state dict names, strict loading, the default dtype, an empty
batch; a pickled layer gives the same bits. Their argument errors: bad_input/."""

import itertools
import pickle

import numpy as np
import pytest

import fastcell
from conftest import TOL

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def make_pair(kind, I, H, dtype, **kw):
    """A torch layer with PyTorch's default initialisation and the fastcell layer loaded from it."""
    torch.manual_seed(0)
    tcls = {"rnn": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind]
    fcls = {"rnn": fastcell.RNN, "rnn_relu": fastcell.RNN, "gru": fastcell.GRU, "lstm": fastcell.LSTM}[kind]
    if kind == "rnn_relu":
        kw["nonlinearity"] = "relu"
    tm = tcls(I, H, dtype=TORCH_DTYPE[dtype], **kw)
    fm = fcls(I, H, dtype=dtype, **kw)
    fm.load_state_dict(tm.state_dict())
    return tm, fm


def run_both(tm, fm, x, hx, lengths, batch_first):
    thx = None
    if hx is not None:
        thx = tuple(map(torch.from_numpy, hx)) if isinstance(hx, tuple) else torch.from_numpy(hx)
    with torch.no_grad():
        tx = torch.from_numpy(x)
        if lengths is not None:
            tx = pack_padded_sequence(tx, torch.from_numpy(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        ty, th = tm(tx, thx)
        if lengths is not None:
            ty, _ = pad_packed_sequence(ty, batch_first=batch_first)
    fy, fh = fm(x, hx, lengths)
    th = tuple(t.numpy() for t in th) if isinstance(th, tuple) else th.numpy()
    return (fy, fh), (ty.numpy(), th)


def assert_close(got, want, dtype):
    got_y, got_h = got
    want_y, want_h = want
    assert got_y.shape == want_y.shape and got_y.dtype == dtype
    assert np.max(np.abs(got_y - want_y), initial=0) <= TOL[dtype]
    for g, w in zip(got_h if isinstance(got_h, tuple) else (got_h,),
                    want_h if isinstance(want_h, tuple) else (want_h,)):
        assert g.shape == w.shape
        assert np.max(np.abs(g - w), initial=0) <= TOL[dtype]


CASES = [
    (kind, L, bi, bf, proj, lengths)
    for kind, L, bi, bf, proj, lengths in itertools.product(
        ["rnn", "rnn_relu", "gru", "lstm"], [1, 2, 3], [False, True], [False, True], [0, 4],
        ["none", "random", "unbatched"])
    if not (proj and kind != "lstm")
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("kind,num_layers,bidirectional,batch_first,proj,lengths", CASES,
                         ids=lambda v: str(v))
def test_layer_matches_torch(kind, num_layers, bidirectional, batch_first, proj, lengths, dtype, rng):
    I, H, T, B = 5, 9, 13, 5
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    if proj:
        kw["proj_size"] = proj
    tm, fm = make_pair(kind, I, H, dtype, **kw)
    D, P = (2 if bidirectional else 1), (proj or H)
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    h0 = rng.standard_normal((D * num_layers, B, P)).astype(dtype)
    c0 = rng.standard_normal((D * num_layers, B, H)).astype(dtype)
    lens = None
    if lengths == "random":
        # unsorted, including a length-1 and a full-length sequence
        lens = np.array([4, T, 1, rng.integers(1, T + 1), 7], dtype=np.int64)
    elif lengths == "unbatched":
        x = x[0] if batch_first else x[:, 0]
        h0, c0 = h0[:, 0], c0[:, 0]
    hx = (h0, c0) if kind == "lstm" else h0
    assert_close(*run_both(tm, fm, x, hx, lens, batch_first), dtype)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_default_state_and_all_full_lengths(kind, rng):
    tm, fm = make_pair(kind, 3, 6, np.float64, num_layers=2, bidirectional=True)
    x = rng.standard_normal((8, 4, 3))
    want = run_both(tm, fm, x, None, None, False)
    assert_close(*want, np.float64)
    # lengths that are all full take the no-packing path and give the same result
    got = fm(x, None, np.full(4, 8))
    assert np.array_equal(got[0], want[0][0])


def test_lengths_shorter_than_padding_give_pad_packed_length(rng):
    tm, fm = make_pair("gru", 3, 4, np.float64, bidirectional=True)
    x = rng.standard_normal((10, 3, 3))
    lens = np.array([6, 2, 5])
    got, want = run_both(tm, fm, x, None, lens, False)
    assert got[0].shape == (6, 3, 8)
    assert_close(got, want, np.float64)
    assert np.all(got[0][2:, 1] == 0)  # zeros past a sequence's length


def test_batch_of_zero(rng):
    fm = fastcell.LSTM(3, 4, num_layers=2)
    y, (h, c) = fm(np.zeros((5, 0, 3), np.float32))
    assert y.shape == (5, 0, 4) and h.shape == (2, 0, 4) and c.shape == (2, 0, 4)


def test_state_dict_round_trip_and_strict_loading(rng):
    tm, fm = make_pair("lstm", 3, 6, np.float32, num_layers=2, proj_size=2, bidirectional=True)
    sd = fm.state_dict()
    assert set(sd) == set(tm.state_dict())
    for k, v in tm.state_dict().items():
        assert np.array_equal(sd[k], v.numpy())
    bad = dict(sd)
    del bad["weight_hh_l1"]
    bad["weight_ih_l0"] = np.zeros((3, 3), np.float32)
    bad["extra"] = np.zeros(1, np.float32)
    with pytest.raises(fastcell.StateDictError) as e:
        fm.load_state_dict(bad)
    msg = str(e.value)
    assert "missing: weight_hh_l1" in msg and "unexpected: extra" in msg and "mis-shaped: weight_ih_l0" in msg


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_pickle_round_trip(kind, rng):
    _, fm = make_pair(kind, 3, 5, np.float32, num_layers=2, bidirectional=True)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    clone = pickle.loads(pickle.dumps(fm))
    a, b = fm(x), clone(x)
    assert np.array_equal(a[0], b[0])
    assert all(not v.flags.writeable for v in clone.state_dict().values())


@pytest.mark.parametrize("dtype, want", [(None, np.float32), ("float64", np.float64),
                                         (np.float32, np.float32)])
def test_dtype_none_is_float32_as_in_torch(dtype, want):
    assert fastcell.LSTM(3, 4, dtype=dtype).dtype == want
