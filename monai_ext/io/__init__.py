"""Input and output in the images' native space: model <-> native grids, ITK/ANTs-compatible files, QA figures."""
