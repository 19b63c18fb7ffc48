"""The README's knee-schedule grid: the knee of a stored cache study's front beside the 100-step teacher.

    python scripts/make_front_figures.py STORE [--study ecad] [--out docs/knee_vs_teacher.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from schedsearch.calibration.calibration_set import teacher_schedule
from schedsearch.results.export import front_records
from schedsearch.results.plots import sample_grid_figure
from schedsearch.results.store import ResultStore
from schedsearch.runtime.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("--study", default="ecad")
    parser.add_argument("--out", type=Path, default=Path("docs/knee_vs_teacher.png"))
    args = parser.parse_args()
    with ResultStore(args.store, create=False) as store:
        records, _objectives, knee = front_records(store, args.study, {"psnr": "max", "macs": "min"})
    record = records[knee]
    model = load_model("builtin:mnist-dit")
    classes = [c for c in range(10) for _ in range(4)]
    seeds = [500 + i for i in range(len(classes))]  # not calibration seeds: a fresh look
    fig = sample_grid_figure(model, record.to_schedule(), teacher_schedule(model.info.name, 1000, 100), classes,
                             seeds, nrow=4)
    fig.suptitle(f"knee of the ECAD front: PSNR {record.metrics['psnr']:.1f} dB to the teacher on the calibration set, "
                 f"recompute fraction {record.summary.get('recompute_fraction', float('nan')):.2f}", fontsize=9)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
