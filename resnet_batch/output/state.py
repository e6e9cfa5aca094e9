"""state module: `_state.json`, what an output is (input, format, layout, pass-through columns), the shard
numbering, a sync in progress, and the history of runs (what `resnet-batch status` shows)."""
from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import pyarrow as pa

from resnet_batch.output.store import STATE_FILE, OutputStore

VERSION = 2
HISTORY = 100  # runs kept in the history


def schema_to_text(fields: tuple[pa.Field, ...]) -> str:
    return base64.b64encode(pa.schema(list(fields)).serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> tuple[pa.Field, ...]:
    return tuple(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text))))


@dataclass
class OutputState:
    """What _state.json holds."""

    input: str
    format: str
    root: str
    protocol: str
    layout: dict
    passthrough: str = ""  # schema_to_text of the pass-through output columns
    next_shard: int = 0
    pending: Optional[dict] = None  # a sync committed but not applied: {"run": N}
    runs: list = field(default_factory=list)
    version: int = VERSION

    @property
    def passthrough_fields(self) -> tuple[pa.Field, ...]:
        return schema_from_text(self.passthrough) if self.passthrough else ()

    def run(self, number: int) -> dict:
        for r in self.runs:
            if r.get("run") == number:
                return r
        raise KeyError(number)

    def next_run(self) -> int:
        return max((r.get("run", 0) for r in self.runs), default=0) + 1


def load(store: OutputStore) -> Optional[OutputState]:
    data = store.read_json(STATE_FILE)
    if data is None:
        return None
    known = {k: v for k, v in data.items() if k in OutputState.__dataclass_fields__}
    return OutputState(**known)


def save(store: OutputStore, state: OutputState) -> None:
    state.runs = state.runs[-HISTORY:]
    store.write(STATE_FILE, asdict(state))


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
