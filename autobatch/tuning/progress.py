"""Progress bars on stderr (tqdm): one over the study's trials, one over the running trial's
samples. Only the CLI turns them on; the library stays silent."""

from __future__ import annotations

from autobatch.records import EvalPoint, TrialRecord


class Progress:
    """A bar over trials and one over the running trial's samples."""

    def __init__(self, total: int | None, initial: int) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.trials = tqdm(total=total, initial=initial, desc="trials", unit="trial")
        self.trial = None

    def start_trial(self, record: TrialRecord, total_samples: int) -> None:
        self.trial = self._tqdm(
            total=total_samples,
            desc=f"trial {record.number} (batch {record.batch_size})",
            unit="sample",
            unit_scale=True,
            leave=False,
            position=1,
            disable=None,  # nested bars only where a terminal can redraw them
        )

    def evaluated(self, point: EvalPoint) -> None:
        if self.trial is not None:
            self.trial.update(point.samples - self.trial.n)
            self.trial.set_postfix(val_loss=f"{point.val_loss_smoothed:.4f}")

    def end_trial(self, record: TrialRecord) -> None:
        if self.trial is not None:
            self.trial.close()
            self.trial = None
        self.trials.update(1)
        self.trials.set_postfix(last=f"{record.state}")

    def finished_elsewhere(self, finished: int) -> None:
        """Catch up with trials other workers finished."""
        if finished > self.trials.n:
            self.trials.update(finished - self.trials.n)

    def close(self) -> None:
        if self.trial is not None:
            self.trial.close()
        self.trials.close()
