"""ResponseLog: the run folder's ``responses.jsonl`` and ``run.json``, which make a run resumable.

One JSON line per answered sample, appended and flushed batch by batch. On restart the
ids already in the file are skipped, so an interrupted run continues where it stopped and
never answers a sample twice. A last line cut off mid-write (no newline, not valid JSON)
is dropped and its sample answered again. ``run.json`` holds the settings the answers
depend on (model, safety config, benchmark, judge, generation settings); resuming with
different settings is an error, so one file never mixes two runs.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .samples import EvaluationError

RESPONSES_FILE = "responses.jsonl"
SETTINGS_FILE = "run.json"
LOCK_FILE = ".lock"


class ResponseLog:
    """The responses and settings files of one run folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / RESPONSES_FILE
        self.settings_path = self.folder / SETTINGS_FILE
        self._lock = None

    def bind(self, settings: dict) -> None:
        """Create the folder and take it for this process (one run writes a folder at a time),
        then record ``settings``, or check them against a run already there."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_folder()
        try:
            self._check_settings(json.loads(json.dumps(settings, default=str)))
        except BaseException:
            self.release()
            raise

    def _check_settings(self, settings: dict) -> None:
        if self.settings_path.exists():
            try:
                recorded = json.loads(self.settings_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise EvaluationError(f"cannot read the run settings: {error}", source=self.settings_path) from None
            for key in sorted(set(recorded) | set(settings)):
                if recorded.get(key) != settings.get(key):
                    raise EvaluationError(
                        f"this folder holds a run with other settings ({key}: {json.dumps(recorded.get(key))} here, "
                        f"{json.dumps(settings.get(key))} now); resume with the same settings or use another output "
                        "folder",
                        source=self.settings_path,
                    )
        elif self.path.exists() and self.path.stat().st_size:
            raise EvaluationError(
                f"{RESPONSES_FILE} exists without {SETTINGS_FILE}; use another output folder", source=self.path
            )
        else:
            self.settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    def release(self) -> None:
        """Let another run write the folder (also done by the OS when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_folder(self) -> None:
        if self._lock is not None:
            return
        handle = (self.folder / LOCK_FILE).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EvaluationError(
                "another vlm-safety eval is writing this folder; wait for it or use another output folder",
                source=self.folder,
            ) from None
        self._lock = handle

    def read(self) -> dict[str, dict]:
        """The records so far, by sample id, in file order; drops a cut-off last line."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
        if complete != data:  # a write interrupted mid-line: keep what is whole
            tail = data[len(complete) :]
            try:
                json.loads(tail)
            except ValueError:
                with self.path.open("r+b") as handle:
                    handle.truncate(len(complete))
            else:  # a whole record without its newline: keep it
                with self.path.open("ab") as handle:
                    handle.write(b"\n")
                complete = data + b"\n"
        records: dict[str, dict] = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvaluationError(f"invalid JSON: {error.msg}", source=self.path, where=f"line {number}") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise EvaluationError(
                    "expected a response record with a string 'id'", source=self.path, where=f"line {number}"
                )
            if record["id"] in records:
                raise EvaluationError(
                    f"sample id {record['id']!r} appears twice", source=self.path, where=f"line {number}"
                )
            records[record["id"]] = record
        return records

    def append(self, records: list[dict]) -> None:
        """Append records as JSON lines and flush them to disk."""
        text = "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
