"""Draw docs/images/concepts_batch_sizes.png from real runs of the built-in ``digits`` task.

Three runs of the same model from the same seed, through autobatch's own trial loop
(``autobatch.tuning.loop.train``): batch size 1 (stochastic), 32 (the task's mini-batch) and the
whole training set (full batch). The learning rate follows the sqrt rule autobatch uses for
AdamW, from the task's 1e-3 at batch size 32: ``1e-3 * sqrt(batch_size / 32)``. Each run trains
the same number of epochs; the left panel puts validation loss against training seconds
(evaluation excluded), the right one against epochs.

    python docs/make_concepts_figure.py [--epochs 20] [--out docs/images/concepts_batch_sizes.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from autobatch.data import BatchSource  # noqa: E402
from autobatch.examples import digits  # noqa: E402
from autobatch.tuning.loop import train  # noqa: E402
from autobatch.tuning.space import scale_lr  # noqa: E402

OUT = Path(__file__).parent / "images" / "concepts_batch_sizes.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine

    task = digits()
    source = BatchSource(task.train_data, task.device).to_device()
    val = BatchSource(task.val_data, task.device).to_device()
    n = len(source)
    runs = [
        ("batch size 1 (stochastic)", 1, "tab:red"),
        (f"batch size {task.batch_size} (mini-batch)", task.batch_size, "tab:blue"),
        (f"batch size {n} (full batch)", n, "tab:green"),
    ]
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for label, size, color in runs:
        lr = scale_lr(task.lr, task.batch_size, size, "sqrt")
        points = []
        run = train(
            task,
            source,
            val,
            batch_size=size,
            lr=lr,
            max_epochs=args.epochs,
            eval_batch_size=len(val),
            on_eval=points.append,
        )
        iterations = math.ceil(n / size)
        legend = (
            f"{label}: {iterations:,} iteration{'s' if iterations > 1 else ''}/epoch, lr {lr:.2g}"
        )
        seconds = [p.seconds for p in points]
        epochs = [p.epoch for p in points]
        losses = [p.val_loss for p in points]
        by_time.plot(seconds, losses, "o-", color=color, markersize=3, label=legend)
        by_epoch.plot(epochs, losses, "o-", color=color, markersize=3, label=legend)
        print(
            f"{label}: lr {lr:.3g}, {iterations} it/epoch, {run.train_seconds:.2f} training s, "
            f"best val loss {min(losses):.4f}, last {losses[-1]:.4f}"
        )

    by_time.set_xscale("log")
    by_time.set_xlabel("training time (seconds, log scale; evaluation excluded)")
    by_time.set_ylabel("validation loss (cross-entropy, nats)")
    by_time.set_title("Validation loss against training time")
    by_epoch.set_xlabel(f"epochs (passes over the {n:,} training images)")
    by_epoch.set_title(f"The same runs against epochs ({args.epochs:g} each)")
    for ax in (by_time, by_epoch):
        ax.grid(True, alpha=0.3)
    by_epoch.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        "digits task, same model and seed; AdamW, lr = 1e-3 x sqrt(batch size / 32)",
        fontsize=11,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
