"""Benchmarks and end-to-end training comparisons for mango.

- ``bench.gpt``   -- a GPT-2-style model with NormFormer switches (the model the demo trains)
- ``bench.data``  -- byte-level text corpora that need no download (Python's own docs / sources)
- ``bench.train`` -- ``python -m bench.train``: AdamW vs Muon vs MANGO (and MANGO ablations), the main job
- ``bench.step``  -- ``python -m bench.step``: optimizer step time vs peers and the roofline floor
  (``params``: parameter sets, ``roofline``: floors, ``measure``: timing, ``optimizers``: the
  contenders, ``kernels``: per-kernel and per-NS-bucket timings, ``report``: JSON/markdown/PNG)
- ``bench.comm``  -- ``python -m bench.comm``: communication per step under FSDP2
- ``bench.aot``   -- ``python -m bench.aot``: every kernel of a GPT-2 124M step compiled for sm_90, no GPU needed
- ``bench.gpu``   -- ``bash ci/gpu.sh``: the whole GPU check (tests, step, training) in one command and one folder
- ``bench.docs_tables`` -- ``python -m bench.docs_tables [--check]``: the results tables of README.md and docs/
  rendered from the committed JSON (``targets``: the performance contract's figures)
"""
