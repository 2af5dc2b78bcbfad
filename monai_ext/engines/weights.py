"""Load trained weights into an evaluator's network with errors that name the file and the mismatch.

MONAI's ``CheckpointLoader`` loads when the engine starts, fails on a missing file with ``torch.load``'s bare
``FileNotFoundError`` and on a checkpoint of another architecture with a long ``load_state_dict`` listing that
never names the file; :class:`NetworkWeightsLoader` reads and checks the file when it is attached to the engine,
i.e. when the bundle config builds the engine, before any data is read, and raises one
:class:`~monai_ext.errors.InputError` line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from monai_ext.checkpoints import check_state_dict, to_network_state_dict
from monai_ext.errors import InputError, MissingInputError

__all__ = ["NetworkWeightsLoader"]


class NetworkWeightsLoader:
    """Ignite handler-like loader of ``path`` into ``network`` when attached to an engine (``enabled=False``: no-op).

    Args:
        path: a ``torch.save`` file holding a state dict, directly or under ``key`` (as ``CheckpointSaver`` writes
            ``{"model": state_dict}`` for ``save_dict={"model": network}``).
        network: the module to fill (``DistributedDataParallel`` / wrapper modules: pass the inner network).
        key: the checkpoint entry holding the state dict, if the file is a dict of several objects. Official
            reference checkpoints are converted to our parameter names (:func:`monai_ext.checkpoints.to_network_state_dict`).
        map_location: passed to ``torch.load``.
        enabled: ``False`` keeps the network's current (e.g. random) weights.

    Raises (at ``attach``, before the engine runs):
        :class:`~monai_ext.errors.MissingInputError` naming a missing ``path``;
        :class:`~monai_ext.errors.InputError` naming ``path`` for an unreadable file, one without a state dict, or
        one of another architecture (with the network class and up to 5 missing, unexpected and shape-mismatched
        parameter names).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        key: str = "model",
        map_location: str | torch.device | None = "cpu",
        enabled: bool = True,
    ) -> None:
        self.path = Path(path)
        self.network = network
        self.key = key
        self.map_location = map_location
        self.enabled = enabled
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine | None = None) -> None:
        """Load the weights now (the engine is not needed: loading once, before it runs, is the point)."""
        self()

    def __call__(self, engine: Engine | None = None) -> None:
        if not self.enabled:
            self.logger.info(f"load_pretrained is false: {type(self.network).__name__} keeps its initial weights")
            return
        if not self.path.is_file():
            raise MissingInputError(
                f"checkpoint not found: {self.path} (train the bundle first, download the weights listed in "
                "large_files.yml, or set load_pretrained to false to run with random weights)"
            )
        try:
            checkpoint = torch.load(self.path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # pickle / zip errors of a corrupt or foreign file
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"cannot read checkpoint {self.path} ({message}): give a torch.save file of weights") from None
        state = checkpoint.get(self.key, checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"checkpoint {self.path} holds no state dict (directly or under {self.key!r})")
        state = to_network_state_dict(self.network, state)
        check_state_dict(self.network, state, f"checkpoint {self.path}")
        self.network.load_state_dict(state)
        self.logger.info(f"loaded {type(self.network).__name__} weights from {self.path}")
