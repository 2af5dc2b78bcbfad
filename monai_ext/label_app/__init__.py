"""MONAI Label atlas-based label propagation with a registration bundle (see ``atlas.py``)."""
