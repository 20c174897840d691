"""TensorBoard's view of a training run: the scalars of train.log, appended to an event file in
MODEL_DIR/tensorboard/ by the training loop itself.

torch's SummaryWriter writes from a thread of its own. When a write fails there (a full disk)
that thread prints a traceback to the user's terminal and the next `add_scalar` raises the error
again in the training loop. TensorBoard only shows what train.log holds, so here a failed write
is one warning, the view stops and training goes on (a full disk then stops training with its
own message when a checkpoint cannot be written).

The file is TensorBoard's own format (TFRecord framing of `Event` protos, the first one naming
the format version), written with the `tensorboard` package's record writer; a run resumed
later appends a new file beside the old ones, as SummaryWriter does.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("aligna")


class EventLog:
    """Scalars for TensorBoard in `directory` (created at the first write)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._file: IO[bytes] | None = None
        self._records: Any = None
        self._off = False  # tensorboard is missing, or a write failed

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Write `prefix/name` = value for each of `values` at training step `step`."""
        if self._off:
            return
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:  # tensorboard is optional at run time
            self._off = True
            return
        try:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                # TensorBoard finds event files by "tfevents" in their names
                name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.0"
                self._file = open(self.directory / name, "ab")
                self._records = RecordWriter(self._file)
                self._records.write(
                    Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
                )
            summary = Summary(
                value=[Summary.Value(tag=f"{prefix}/{k}", simple_value=float(v)) for k, v in values.items()]
            )
            self._records.write(Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
            self._file.flush()  # TensorBoard shows what train.log shows, when it shows it
        except OSError as e:
            log.warning(
                "no more TensorBoard logs: %s: %s (train.log keeps every value)",
                self.directory,
                e.strerror or e,
            )
            self._off = True
            self.close()

    def close(self) -> None:
        """Close the file (idempotent); a failure to flush its last bytes is not the run's."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
