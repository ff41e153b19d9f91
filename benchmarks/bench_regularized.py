"""Cost of each regulariser of bptt's recurrent layers per training step, against the plain layer.

    python benchmarks/bench_regularized.py [--model lstm] [--hidden 128] [--layers 2] [--T 50] [--N 50]
                                           [--repeat 5] [--threads 1]

A training step is forward + backward of the layer alone (with the input gradient), float32,
on the char model's shapes by default (one-hot-sized input D = 96, 2×128, T = N = 50; the
2×512 of the 30-minute model is ``--hidden 512``).
Rows: the plain layer on its default backend (the compiled kernels), the plain layer on the
NumPy reference loop (``backend = "reference"``), then each option alone and all together,
which run :mod:`bptt.nn.regularized_loop` (NumPy).  "vs reference" separates the option's own
work from the price of leaving the compiled loop.  The options that act outside the time loop
(input and output dropout, weight drop) have two rows each: "(compiled)", the layer's own
kernels with the masks around them (what the layer runs), and "(NumPy loop)", the same options
forced through the reference loop (``regularizer.force_reference = True``), as they ran before.
Each figure is the median of ``--repeat`` timed steps (wall time, and the process's CPU time,
which other people's load moves less).  Each configuration is timed in a block of its own after
three untimed steps (the first compiles the kernels): interleaved one step at a time, the compiled
layers ran at half speed at 2 threads (a 2×128 LSTM step 52 ms against 26 ms alone), behind OpenBLAS
threads that the NumPy loop's products had woken and that kept spinning.  The default run takes well under a minute.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from blas import blas_line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lstm", choices=["lstm", "gru", "rnn"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--D", type=int, default=96)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--N", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: a shared machine)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    import bptt

    cls = {"lstm": bptt.LSTM, "gru": bptt.GRU, "rnn": bptt.RNN}[args.model]
    outside = dict(input_dropout=0.25, output_dropout=0.25, weight_drop=0.5)
    configs = {
        "plain (compiled kernels)": ({}, "auto"),
        "plain (NumPy reference loop)": ({}, "reference"),
        "weight_drop=0.5 (compiled)": (dict(weight_drop=0.5), None),
        "input+output_dropout=0.25 (compiled)": (dict(input_dropout=0.25, output_dropout=0.25), None),
        "weight_drop + input+output_dropout (compiled)": (outside, None),
        "weight_drop=0.5 (NumPy loop)": (dict(weight_drop=0.5), "numpy"),
        "input+output_dropout=0.25 (NumPy loop)": (dict(input_dropout=0.25, output_dropout=0.25), "numpy"),
        "weight_drop + input+output_dropout (NumPy loop)": (outside, "numpy"),
        "recurrent_dropout=0.25": (dict(recurrent_dropout=0.25), None),
        "zoneout=0.1": (dict(zoneout=0.1), None),
        "layer_norm": (dict(layer_norm=True), None),
    }
    if args.model == "lstm":
        configs["peephole"] = (dict(peephole=True), None)
    every = dict(recurrent_dropout=0.25, weight_drop=0.5, zoneout=0.1, layer_norm=True)
    if args.model == "lstm":
        every["peephole"] = True
    configs["all of the above"] = (every, None)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.T, args.N, args.D)).astype(np.float32)
    dout = rng.standard_normal((args.T, args.N, args.hidden)).astype(np.float32)
    layers = {}
    for name, (opts, backend) in configs.items():
        layer = cls(args.D, args.hidden, num_layers=args.layers, rng=0, **opts)
        if backend == "numpy":  # options the compiled path runs, forced through the NumPy loop
            layer.regularizer.force_reference = True
        elif backend:
            layer.backend = backend
        layers[name] = layer

    def step(layer):  # as a model's training step runs the layer: in its BLAS scope (one BLAS thread
        with layer.blas_scope(args.T, args.N):  # while the layer runs threads of its own; else no change)
            out, _ = layer(x)
            layer.backward(dout)

    times = {name: [] for name in layers}
    cpu = {name: [] for name in layers}  # process CPU time: less moved by other people's load than wall time
    with threadpool_limits(args.threads):
        for name, layer in layers.items():  # one block per configuration (see the module doc)
            for _ in range(3):
                step(layer)  # untimed: the first compiles the kernels
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                step(layer)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    med = {name: 1e3 * float(np.median(v)) for name, v in times.items()}
    med_cpu = {name: 1e3 * float(np.median(v)) for name, v in cpu.items()}
    plain, ref = med["plain (compiled kernels)"], med["plain (NumPy reference loop)"]
    print(f"{args.model} {args.layers}x{args.hidden}, D={args.D}, T={args.T}, N={args.N}, float32, "
          f"{args.threads} BLAS thread(s), median of {args.repeat} (noisy on a shared machine)")
    with threadpool_limits(args.threads):
        print(f"BLAS: {blas_line()}\n")
    cplain, cref = med_cpu["plain (compiled kernels)"], med_cpu["plain (NumPy reference loop)"]
    print("| configuration | wall ms / step | vs plain | vs reference | CPU ms / step | vs plain | vs reference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ms in med.items():
        c = med_cpu[name]
        print(f"| {name} | {ms:.1f} | {ms / plain:.2f}x | {ms / ref:.2f}x | {c:.1f} | {c / cplain:.2f}x | {c / cref:.2f}x |")


if __name__ == "__main__":
    main()
