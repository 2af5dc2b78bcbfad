"""Metrics: ``deformation`` (Jacobian determinants, folding, SDlogJ, NDV, inverse consistency, TRE)."""
