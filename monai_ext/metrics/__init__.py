"""Metrics: ``deformation`` (Jacobian determinants, folding, SDlogJ, NDV, inverse consistency, TRE), ``overlap``
(Dice, HD95, the per-pair registration table and its ignite ``Metric``) and ``landmarks`` (the landmark TRE as an
ignite ``Metric``). The ignite ``Metric`` classes live here, not in :mod:`monai_ext.engines`, because they only
compute and record metrics from an evaluator's output and import nothing from the engines."""
