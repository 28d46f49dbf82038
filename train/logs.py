"""What rank 0 shows and writes while training: a progress bar (plain lines when stderr is
not a terminal), `log.jsonl` (one record per logged step, as the MLX trainer writes it) and
TensorBoard event files in `out/tensorboard/` (skipped, with one message, without the
`tensorboard` package)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

# Shown on the bar after loss and throughput when a stage logs them (stage 1's codebook usage
# and kept tokens); every metric goes to the JSONL log and TensorBoard.
BAR_FIELDS = ("loss", "samples_per_s", "tokens_per_image", "keep_fraction", "perplexity", "codes_used",
              "dead_codes", "text_loss", "image_loss", "learning_rate")


def truncate_log(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a killed run resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by the kill
    path.write_text("".join(line + "\n" for line in kept))


class TrainLog:
    """Rank 0's progress bar, JSONL log and TensorBoard writer (inert on other ranks)."""

    def __init__(self, out: Path, total: int, start_step: int, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.total, self.start_step = total, start_step
        self.start_time = time.perf_counter()
        self.path: Optional[Path] = out / "log.jsonl" if enabled else None
        self.progress = None
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        truncate_log(self.path, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                      file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("training", total=total, completed=start_step, info="")

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = int(record.get("step", 0))
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()
        shown = [k for k in BAR_FIELDS if k in record] or [k for k in record if k not in ("step", "time")]
        text = " ".join(_format(k, record[k]) for k in shown)
        if self.progress is not None:
            self.progress.update(self.task, completed=step if prefix == "train" else self.progress.tasks[0].completed,
                                 info=text[:120])
        else:
            print(f"{prefix} step {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            if self.progress is not None:
                self.progress.console.print(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return elapsed / done * (self.total - step) if done > 0 else float("nan")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def _format(key: str, value) -> str:
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
