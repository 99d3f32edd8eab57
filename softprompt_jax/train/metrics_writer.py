"""Where training and evaluation numbers go: the console, `metrics.jsonl`, TensorBoard.

`metrics.jsonl` gets one JSON object per logged step (`"kind": "train"`) and per
evaluation (`"kind": "eval"`), so scripts read results without parsing logs.
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
        """Append one JSON line and the matching TensorBoard scalars."""
        if not self.enabled:
            return
        record = {
            "kind": kind,
            "step": step,
            "time": time.time(),
            **{k: _plain(v) for k, v in values.items()},
        }
        storage.append_text(self.path, json.dumps(record) + "\n")
        if self._summary is not None:
            import tensorflow as tf

            with self._summary.as_default(step=step):
                for name, value in record.items():
                    if name not in ("kind", "step", "time") and isinstance(value, float):
                        # `tf.summary.write` with the scalars plugin's metadata is what
                        # `tf.summary.scalar` does, without needing the tensorboard package.
                        tf.summary.write(
                            f"{kind}/{name}",
                            tf.constant(value, tf.float32),
                            metadata=_scalar_metadata(),
                        )
            self._summary.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True, file=sys.stdout)


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return metadata


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))
