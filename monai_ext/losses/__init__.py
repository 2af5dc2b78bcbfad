"""Losses: ``similarity`` (LNCC), ``regularization`` (gradient, NDV), ``symmetric`` (SITReg objective), ``consistency`` (group cycle consistency), ``keymorph``."""
