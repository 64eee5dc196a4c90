#!/usr/bin/env python3
"""Reads a directory of TensorBoard event files with TensorBoard's own EventAccumulator and
prints every scalar as JSON: [[tag, step, value], ...], sorted by tag then step.

Used by stages/tests/tensorboard.rs as the independent reader of what `log.tensorboard` wrote.

    python3 stages/tests/tensorboard_read.py RUN_DIR/tensorboard
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: tensorboard_read.py DIR")
    # 0: keep every scalar (the default samples 10,000 per tag).
    acc = event_accumulator.EventAccumulator(
        sys.argv[1], size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    out = []
    for tag in sorted(acc.Tags()["scalars"]):
        for ev in acc.Scalars(tag):
            # ev.value is the event's float32 as a Python float (exact); json writes it with
            # repr, the shortest text that reads back to the same double.
            out.append([tag, ev.step, ev.value])
    out.sort(key=lambda r: (r[0], r[1]))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
