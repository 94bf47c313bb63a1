"""`mftcoder eval`: code benchmarks (HumanEval pass@k, completions run in a sandbox) and the per-task
validation loss of a trained run. The top layer: nothing else in mftcoder but the CLI imports it."""
