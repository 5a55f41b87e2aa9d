"""The prepared GPU run behind `bash ci/gpu.sh` (see `bench.gpu.run`), and its CPU dry run."""
