"""Networks: ``sitreg`` (SITReg), ``keypoints`` (KeyMorph keypoint backbones and centre of mass), ``keymorph`` (KeyMorph model)."""
