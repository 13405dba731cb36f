"""The demo's evaluation, above every model package: the colour/shape judge of synthetic images (:mod:`.judge`), the
metrics and report of a demo run (:mod:`.report`), the machine calibration (:mod:`.calibrate`) and the per-step
table (:mod:`.steps`). ``python -m zh_t2i_demo --help`` lists its commands."""
