"""Ship trained weights in a bundle: ``models/model.pt``, its sha256 in ``large_files.yml``, metrics in metadata.

    python scripts/ship_weights.py CHECKPOINT BUNDLE [--mean_dice 0.61]

``CHECKPOINT`` is a state dict of the bundle's ``network_def`` (as the validation ``CheckpointSaver`` writes
``model.pt``) or an epoch checkpoint holding it under ``network``. It is loaded into ``network_def`` of
``BUNDLE/configs/inference.json`` (strict: a mismatch fails here, not in a user's run), saved as a plain
state dict to ``BUNDLE/models/model.pt`` (overwriting: one file across the history), and recorded in
``BUNDLE/large_files.yml`` as a shipped file (empty ``url``, sha256). ``--mean_dice`` (the checkpoint's
validation Dice, e.g. the "best value" the training log reports for it) goes into the metadata's ``eval_metrics``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser

HEADER = """# Large files of this bundle (checked with python -m monai.bundle download_large_files --bundle_path <bundle>).
#
# models/model.pt is trained by this project and ships inside the bundle (empty url): download_large_files only
# verifies its sha256. Written by scripts/ship_weights.py.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("bundle")
    parser.add_argument("--mean_dice", type=float, default=None)
    args = parser.parse_args()
    bundle = Path(args.bundle)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = state.get("network", state)
    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "inference.json"))
    network = config.get_parsed_content("network_def")
    network.load_state_dict(state, strict=True)
    target = bundle / "models" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    entry = {"path": "models/model.pt", "url": "", "hash_val": digest, "hash_type": "sha256"}
    (bundle / "large_files.yml").write_text(HEADER + yaml.safe_dump({"large_files": [entry]}, sort_keys=False))
    print(f"{target}: {target.stat().st_size / 1e6:.2f} MB, sha256 {digest}")
    if args.mean_dice is not None:
        meta_path = bundle / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["eval_metrics"] = {"mean_dice": round(args.mean_dice, 4)}
        meta_path.write_text(json.dumps(meta, indent=4) + "\n")
        print(f"eval_metrics: {meta['eval_metrics']}")


if __name__ == "__main__":
    main()
