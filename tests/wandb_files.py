"""Read an offline W&B run back from its ``.wandb`` file: W&B's own protobuf records
(``wandb.proto.wandb_internal_pb2.Record``) in the leveldb-log framing W&B writes them in
(the installed wandb has no Python reader of its own)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # ident, magic, version
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path} is not a W&B transaction log"
    out, pos, parts = [], len(HEADER), []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def finished_records(path: Path, timeout: float = 20.0) -> list[Any]:
    """The records of a finished run: ``run.finish()`` returns before W&B's service has
    written the last of them, so wait (briefly) until the exit record has landed."""
    deadline = time.monotonic() + timeout
    while True:
        size = Path(path).stat().st_size
        found = records(path) if size > len(HEADER) else []
        kinds = [r.WhichOneof("record_type") for r in found]
        if "exit" in kinds and Path(path).stat().st_size == size:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout:g} s ({kinds[-3:]})")
        time.sleep(0.02)


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class Run:
    """What one offline run directory holds."""

    id: str
    resumed: bool
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # history rows, with "_step"
    summary: dict[str, Any]
    exit_code: int | None
    artifacts: list[Any] = field(default_factory=list)


def read_run(folder: Path) -> Run:
    """The run in an ``offline-run-*`` folder."""
    (path,) = Path(folder).glob("run-*.wandb")
    run_id, resumed, config, rows, summary, exit_code, artifacts = "", False, {}, [], {}, None, []
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, resumed = record.run.run_id, record.run.resume
            for item in record.run.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            rows.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return Run(run_id, resumed, config, rows, summary, exit_code, artifacts)


def offline_runs(wandb_dir: Path) -> list[Run]:
    """Every offline run under ``WANDB_DIR``, oldest first."""
    folders = sorted((Path(wandb_dir) / "wandb").glob("offline-run-*"))
    return [read_run(f) for f in folders]
