"""Load trained weights into an evaluator's network with errors that name the file and the mismatch.

MONAI's ``CheckpointLoader`` fails on a missing file with ``torch.load``'s bare ``FileNotFoundError`` and on a
checkpoint of another architecture with a long ``load_state_dict`` listing that never names the file;
:class:`NetworkWeightsLoader` checks both before the run starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from monai_ext.checkpoints import check_state_dict, to_network_state_dict

__all__ = ["NetworkWeightsLoader"]


class NetworkWeightsLoader:
    """Ignite handler loading ``path`` into ``network`` when the engine starts (``enabled=False``: no-op).

    Args:
        path: a ``torch.save`` file holding a state dict, directly or under ``key`` (as ``CheckpointSaver`` writes
            ``{"model": state_dict}`` for ``save_dict={"model": network}``).
        network: the module to fill (``DistributedDataParallel`` / wrapper modules: pass the inner network).
        key: the checkpoint entry holding the state dict, if the file is a dict of several objects. Official
            reference checkpoints are converted to our parameter names (:func:`monai_ext.checkpoints.to_network_state_dict`).
        map_location: passed to ``torch.load``.
        enabled: ``False`` keeps the network's current (e.g. random) weights.

    Raises (at ``attach`` for a missing file, when the engine starts for a bad one):
        FileNotFoundError naming ``path``; ValueError naming ``path``, the network class and up to 5 missing,
        unexpected and shape-mismatched parameter names when the checkpoint is of another architecture.
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

    def attach(self, engine: Engine) -> None:
        if self.enabled and not self.path.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {self.path} (train the bundle first, download the weights listed in "
                "large_files.yml, or set load_pretrained to false to run with random weights)"
            )
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not self.enabled:
            self.logger.info(f"load_pretrained is false: {type(self.network).__name__} keeps its initial weights")
            return
        try:
            checkpoint = torch.load(self.path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # pickle / zip errors of a corrupt or foreign file
            raise ValueError(f"cannot read checkpoint {self.path}: {err}") from None
        state = checkpoint.get(self.key, checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"checkpoint {self.path} holds no state dict (directly or under {self.key!r})")
        state = to_network_state_dict(self.network, state)
        check_state_dict(self.network, state, f"checkpoint {self.path}")
        self.network.load_state_dict(state)
        self.logger.info(f"loaded {type(self.network).__name__} weights from {self.path}")
