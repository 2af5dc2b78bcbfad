"""Resume an interrupted training from the newest epoch checkpoint.

MONAI's ``CheckpointLoader`` needs the checkpoint path when the config is parsed; after an interruption
that path is whatever epoch the run reached, so bundles cannot name it in advance. This handler looks for
the newest ``*.pt`` written by ``CheckpointSaver`` (``checkpoint_epoch=<E>.pt``) when the engine starts
and restores every object of ``load_dict`` from it (network, optimizer and the trainer's epoch and
iteration counters), so a killed run loses at most the epoch in progress.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

__all__ = ["latest_checkpoint", "ResumeFromLatestCheckpoint", "pretrained_load_dict", "start_at_epoch"]

_EPOCH = re.compile(r"epoch=(\d+)")


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``*.pt`` file in ``directory`` with the largest ``epoch=<E>`` in its name, or ``None``."""
    directory = Path(directory)
    candidates = [(int(m.group(1)), p) for p in directory.glob("*.pt") if (m := _EPOCH.search(p.name))]
    return max(candidates)[1] if candidates else None


class ResumeFromLatestCheckpoint:
    """Load ``load_dict`` from the newest epoch checkpoint in ``directory`` when the engine starts.

    Args:
        directory: the ``save_dir`` of the epoch ``CheckpointSaver``.
        load_dict: objects to restore, keyed as in the saver's ``save_dict`` (e.g. network, optimizer, trainer).
        map_location: passed to ``torch.load``.
        enabled: ``False`` always starts from scratch.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: str | torch.device | None = "cpu",
        enabled: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.enabled = enabled
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.directory) if self.enabled else None
        if path is None:
            self.logger.info(f"no epoch checkpoint in {self.directory}: training from the start")
            return
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        missing = sorted(set(self.load_dict) - set(checkpoint))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {missing}; it holds {sorted(checkpoint)}")
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint)
        engine.state.max_epochs = max_epochs  # the configured length wins over the saved one
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


def pretrained_load_dict(
    network: torch.nn.Module, optimizer: torch.optim.Optimizer, load_optimizer_state: bool = False
) -> dict[str, Any]:
    """``load_dict`` of a :class:`ResumeFromLatestCheckpoint` that starts a fine-tune from another run's checkpoint:
    ``{"network": network}``, plus ``"optimizer": optimizer`` with ``load_optimizer_state`` (Adam's moments and
    learning rate of that run instead of a fresh optimizer)."""
    load_dict: dict[str, Any] = {"network": network}
    if load_optimizer_state:
        load_dict["optimizer"] = optimizer
    return load_dict


def start_at_epoch(engine: Engine, epoch: int) -> None:
    """Let ``engine`` (set up, not yet run) start after ``epoch`` completed epochs: ``state.epoch = epoch`` and
    ``state.iteration = epoch * state.epoch_length`` (e.g. a fine-tune that continues the epoch count and the
    epoch-based schedules of the run it starts from)."""
    engine.state.epoch = epoch
    engine.state.iteration = epoch * engine.state.epoch_length
