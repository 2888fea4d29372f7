"""Model-parallel utilities: the process grid, TP layers and mappings, vocab-parallel cross-entropy."""
from megallama.mpu import parallel_state  # noqa: F401
from megallama.mpu.sequence_parallel import allreduce_sequence_parallel_gradients  # noqa: F401
