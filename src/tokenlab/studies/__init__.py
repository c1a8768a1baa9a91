"""Studies: multi-run pipelines built on the engine and the evaluators (layer 5, beside the CLI).

- ``stl_study``: the STL study (labeler -> baseline -> student -> evaluation -> tokens -> report -> verdict),
  written once and run by ``tokenlab demo`` and ``scripts/cifar10_stl.py``;
- ``demo``: ``tokenlab demo``: the synthetic set, the study at a laptop budget, an optional iBOT stage, a summary.
"""
