"""Would batching several candidates' samples into one forward pass pay on this machine? Denoiser rows per second
of the builtin DiT against the rows per call, the question issue 19's "several candidates in one forward" asks.

An evaluation of 32 samples makes 64-row calls (a CFG pair per sample); batching k candidates would make 64·k-row
calls. Each size is timed in interleaved rounds (every size once per round, the order rotating), after a warm-up,
and the median seconds per call over rounds is reported with the rows per second and the ratio to 64 rows.

    python benchmarks/batch_throughput.py [--rounds 7] [--calls 10]

Prints one JSON object and writes benchmarks/results/batch_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from schedsearch.runtime.models import initial_noise, load_model

SAMPLES_PER_CALL = (8, 16, 32, 64, 128, 256)  # rows = 2 × samples (CFG pair)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="denoiser calls per timing")
    args = parser.parse_args()
    model = load_model("builtin:mnist-dit")
    inputs = {}
    for n in SAMPLES_PER_CALL:
        x = initial_noise(list(range(n)), model.info.sample_shape)
        inputs[n] = (x, model.denoiser([i % 10 for i in range(n)]))
    times: dict[int, list[float]] = {n: [] for n in SAMPLES_PER_CALL}
    with torch.no_grad():
        for x, denoise in inputs.values():  # warm-up
            denoise(x, 500.0, 0)
        for r in range(args.rounds):
            order = list(SAMPLES_PER_CALL)[r % len(SAMPLES_PER_CALL):] + list(SAMPLES_PER_CALL)[
                : r % len(SAMPLES_PER_CALL)]
            for n in order:
                x, denoise = inputs[n]
                start = time.perf_counter()
                for i in range(args.calls):
                    denoise(x, 900.0 - 40 * i, i)
                times[n].append((time.perf_counter() - start) / args.calls)
    per_call = {n: float(np.median(v)) for n, v in times.items()}
    rows_per_s = {n: 2 * n / s for n, s in per_call.items()}
    out = {"model": model.info.name, "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
           "calls_per_timing": args.calls,
           "sizes": [{"samples": n, "rows": 2 * n, "seconds_per_call": per_call[n],
                      "seconds_spread": [float(min(times[n])), float(max(times[n]))],
                      "rows_per_second": rows_per_s[n], "throughput_vs_64_rows": rows_per_s[n] / rows_per_s[32]}
                     for n in SAMPLES_PER_CALL]}
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).parent / "results" / "batch_throughput.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
