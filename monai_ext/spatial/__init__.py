"""Spatial core shared by every method: pure tensor maths, no I/O and no engines.

One module per concept: ``coordinates`` (voxel / centred-normalised / KeyMorph-normalised / world RAS-LPS
frames), ``sampling`` (sample, warp and compose voxel DDFs), ``bspline`` (cubic B-spline control points and
their invertibility bound), ``inversion`` (deformation inversion layer), ``affine`` (matrix generation and
closed-form fits), ``tps`` (thin-plate splines).
"""
