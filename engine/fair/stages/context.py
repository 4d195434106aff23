"""What every stage receives: the engine, the config, the prompts, and prior records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fairdistill.engine.config import RunConfig
from fairdistill.engine.fair.prompts import PromptSet
from fairdistill.engine.fair.scoring import Calibration
from fairdistill.engine.fair.stages.counts import StageCounts
from fairdistill.engine.rundir.schema import Record
from fairdistill.engine.types import ChatRequest, Completion


class Completer(Protocol):
    async def complete(
        self, endpoint: str, request: ChatRequest, stage: str = "", affinity: str = ""
    ) -> Completion: ...


class Prior(Protocol):
    """Records an interrupted run wrote, by id (a dict, or ``engine.fair.resume.PriorRecords``)."""

    def get(self, record_id: str, /) -> Record | None: ...


_NONE: dict[str, Record] = {}  # no prior records (a fresh run); never written to


@dataclass
class StageContext:
    engine: Completer
    cfg: RunConfig
    prompts: PromptSet
    prior: Prior = field(default_factory=lambda: _NONE)  # records of unfinished problems (fair.resume)
    counts: StageCounts = field(default_factory=StageCounts)  # live figures for progress and report
    calibration: Calibration = field(default_factory=Calibration)  # aggregation = "calibrated"

    @property
    def version(self) -> str:
        return self.prompts.version

    def reuse(self, record_id: str) -> Record | None:
        """A record an interrupted run already wrote: reused instead of asking again."""
        return self.prior.get(record_id)
