"""Iterations and handlers for MONAI's engines: ``registration`` (SITReg pairs), ``keymorph``, ``consistency``, ``resume``."""
