"""monai_ext: registration components (SITReg, KeyMorph/BrainMorph) for MONAI bundles."""

__version__ = "0.1.0"
