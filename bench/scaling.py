"""The scaling model of a split step (issue 19): time per step of a B = 1 LSTM sequence on n cores,
from the weight bytes each core reads per step against its L2, fitted to bench/team.py's 1- and
2-thread measurements on this machine and predicted for 1 to 64 cores.

The model. A step reads the recurrent weights W_hh once (4 H x H weights: 4 bytes each in float32,
1 in int8); split by hidden units, each of n cores reads W/n bytes of its own. Successive steps
walk a slice's panels in alternating order (products.h), so a core's L2 keeps the part it read
last for the next step: up to RESIDENT x L2 of the slice (the rest of the L2 holds h, the gate
rows and the code's data) is read from L2 at the near bandwidth, and the remainder streams from
L3 or memory at the far bandwidth, which the cores share up to a total (FAR_CORES cores' worth: an
assumption, not measurable on 2 cores). The step's other work (gate pass, input projection share)
scales as 1/n with it. The parts meet at one barrier a step, a flat counter: each of the n - 1
other arrivals moves one cache line, SYNC seconds each.

    r = min(W / n, RESIDENT x L2)
    t(n) = r / near + (W / n - r) / (far x min(1, FAR_CORES / n)) + SYNC x (n - 1)

Fitted here, per weight format: the near rate from the 1-thread shapes whose W fits, the far one
from those whose W does not (their resident part taken at the near rate; both rates include the
gate pass and the projection share, per byte of W); SYNC is measured apart
(bench.team.barrier_seconds: a split walk of a tiny RNN). So the 1-thread column is a fit, and
the 2-thread column is a prediction that checks the residency: a shape whose W fits in two L2s
but not in one (float32 H = 512, int8 H = 1024 here) speeds up by more than 2.

    python -m bench.scaling           # prints the model with this machine's defaults
"""

import os
import statistics
from pathlib import Path

RESIDENT = 0.75          # the share of an L2 a slice may take and stay resident
FAR_CORES = 8            # total far bandwidth: this many cores' worth (assumed)
CORES = (1, 2, 4, 8, 16, 32, 64)
BYTES = {"float32": 4, "int8": 1}


def l2_bytes(default=2 << 20):
    """One core's L2 in bytes (sysfs: cpu0's unified level-2 cache), else `default`."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == "2":
                size = (idx / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return default


def weight_bytes(H, fmt):
    return 4 * H * H * BYTES[fmt]


class Model:
    """Per weight format: the near and far rates (bytes of W a second, a core: they carry the
    format's own work per byte, int8's activation quantizing and its integer products among
    it); one barrier's cost."""

    def __init__(self, near, far, sync, l2):
        self.near, self.far, self.sync, self.l2 = near, far, sync, l2

    def step(self, H, fmt, n):
        """Seconds per step of an H LSTM in fmt on n cores."""
        w = weight_bytes(H, fmt) / n
        r = min(w, RESIDENT * self.l2)
        far = self.far[fmt] * min(1.0, FAR_CORES / n)
        return r / self.near[fmt] + (w - r) / far + self.sync * (n - 1)


def _b1_rows(rows):
    """(H, fmt, {threads: seconds per step}) of the B = 1 sequences measured by bench.team."""
    out = []
    for row in rows:
        mode, T, B, H = row["shape"]
        if mode != "sequence" or B != 1:
            continue
        for fmt in BYTES:
            t = {n: row["per_call"].get(f"fastcell {fmt} {n}t") for n in (1, 2)}
            if None not in t.values():
                out.append((H, fmt, {n: v / T for n, v in t.items()}))
    return out


def fit(rows, sync, l2=None):
    """The Model fitted to bench.team's 1-thread rows (the module's docstring); sync: one
    barrier's seconds, measured (bench.team.barrier_seconds)."""
    l2 = l2 or l2_bytes()
    b1 = _b1_rows(rows)
    near, far = {}, {}
    for fmt in BYTES:
        r = RESIDENT * l2
        inside = [weight_bytes(H, f) / t[1] for H, f, t in b1
                  if f == fmt and weight_bytes(H, f) <= r]
        if not inside or len(inside) == sum(f == fmt for _, f, _ in b1):
            raise ValueError(f"scaling: need {fmt} B = 1 shapes both inside and beyond one L2")
        near[fmt] = statistics.median(inside)
        far[fmt] = statistics.median((weight_bytes(H, f) - r) / max(t[1] - r / near[fmt], 1e-12)
                                     for H, f, t in b1 if f == fmt and weight_bytes(H, f) > r)
    return Model(near, far, sync, l2)


def fit_and_predict(rows, sync, l2=None):
    """{model, check: [(H, fmt, n, measured, predicted)], predict: {(H, fmt): [t(n) for CORES]}}."""
    m = fit(rows, sync, l2)
    check = [(H, f, n, t[n], m.step(H, f, n)) for H, f, t in _b1_rows(rows) for n in (1, 2)]
    predict = {(H, f): [m.step(H, f, n) for n in CORES]
               for H in (256, 512, 1024, 2048) for f in BYTES}
    return {"model": m, "check": check, "predict": predict}


def scaling_markdown(res):
    m = res["model"]
    rates = "; ".join(f"{f}: near {m.near[f] / 1e9:.0f} GB/s, far {m.far[f] / 1e9:.0f} GB/s"
                      for f in BYTES)
    L = [f"Fitted to the 1-thread column: L2 {m.l2 / 2**20:.1f} MiB a core (up to {RESIDENT:.0%} of it "
         f"keeps a slice's part resident from step to step); rates of W a core ({rates}; far shared by at most "
         f"{FAR_CORES} cores' worth in all, assumed). Measured: one barrier of 2 threads "
         f"{m.sync * 1e9:.0f} ns (bench.team.barrier_seconds), counted once per extra core.", "",
         "| shape (B = 1) | threads | measured µs/step | model µs/step | model / measured |",
         "|---|--:|--:|--:|--:|"]
    for H, f, n, meas, pred in res["check"]:
        L.append(f"| H={H} {f} | {n} | {meas * 1e6:.2f} | {pred * 1e6:.2f} | {pred / meas:.2f} |")
    L += ["", "Predicted µs per step (speed-up over 1 core) on a server with this machine's "
          "per-core L2 and bandwidths:", "",
          "| shape | " + " | ".join(f"{n} cores" for n in CORES) + " |",
          "|---|" + "--:|" * len(CORES)]
    for (H, f), ts in res["predict"].items():
        L.append(f"| H={H} {f} ({weight_bytes(H, f) / 2**20:g} MiB) | "
                 + " | ".join(f"{t * 1e6:.1f} ({ts[0] / t:.1f}×)" for t in ts) + " |")
    return "\n".join(L)


if __name__ == "__main__":
    print(f"L2 a core: {l2_bytes() / 2**20:.1f} MiB ({os.cpu_count()} CPUs); run python -m "
          "bench.team to fit the model to measurements")
