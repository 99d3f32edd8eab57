"""Where training and evaluation numbers go: the console, `metrics.jsonl`, TensorBoard.

`metrics.jsonl` gets one JSON object per logged step (`"kind": "train"`) and per
evaluation (`"kind": "eval"`; with one prompt per task, one per task, naming it in
`"task"`), so scripts read results without parsing logs. Every line is
valid JSON (a NaN or infinite value is written as null), and a resumed run first drops the
records after the step it resumes from, so the file holds one history.
Only process 0 writes; `model_dir` may be local or a `gs://` URL.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import jax

from softprompt_jax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    def __init__(self, model_dir: storage.PathLike, *, tensorboard: bool = True) -> None:
        self.enabled = jax.process_index() == 0
        self.path = storage.as_path(model_dir) / METRICS_FILE
        self._summary = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                import tensorflow as tf  # seqio depends on it already

                self._summary = tf.summary.create_file_writer(
                    str(self.path.parent / TENSORBOARD_DIR)
                )

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append one JSON line and the matching TensorBoard scalars (`kind[/task]/name`)."""
        if not self.enabled:
            return
        record = storage.finite_or_none(  # NaN and infinities as null: JSON has neither
            {"kind": kind, "step": step, "time": time.time()}
            | {k: _plain(v) for k, v in values.items()}
        )
        storage.append_text(self.path, storage.strict_json(record) + "\n")
        if self._summary is not None:
            import tensorflow as tf

            prefix = "/".join([kind, *([record["task"]] if "task" in record else [])])
            with self._summary.as_default(step=step):
                for name, value in record.items():
                    if name not in ("kind", "step", "time") and isinstance(value, float):
                        # `tf.summary.write` with the scalars plugin's metadata is what
                        # `tf.summary.scalar` does, without needing the tensorboard package.
                        tf.summary.write(
                            f"{prefix}/{name}",
                            tf.constant(value, tf.float32),
                            metadata=_scalar_metadata(),
                        )
            self._summary.flush()

    def keep_until(self, step: int) -> list[dict]:
        """Drop the records after `step` (a resumed run redoes them); the records kept.

        A line cut short by a kill mid-append is dropped too. The file is rewritten
        atomically, and only when something is dropped.
        """
        if not self.enabled or not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        kept = [(line, record) for line, record in map(_parsed, lines) if record is not None]
        kept = [(line, record) for line, record in kept if record.get("step", 0) <= step]
        if len(kept) < len(lines):
            storage.write_text_atomic(self.path, "".join(line + "\n" for line, _ in kept))
        return [record for _, record in kept]

    def console(self, line: str) -> None:
        console(line)


def console(line: str) -> None:
    """A progress line on stdout, from process 0 only."""
    if jax.process_index() == 0:
        print(line, flush=True, file=sys.stdout)


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return metadata


def _plain(value):
    """A float for numbers (device scalars included); others as given."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _parsed(line: str) -> tuple[str, dict | None]:
    try:
        record = json.loads(line)
    except ValueError:
        return line, None
    return line, record if isinstance(record, dict) else None


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))
