"""Checkpoints you can trust: atomic, verified (size/CRC manifest), exactly resumable, reshardable across
tp/pp/dp/ZeRO/vpp layouts, loaded with ``torch.load(weights_only=True)``; HF conversion in tools/convert_checkpoint.py.

Training calls ``check_writable``, ``save_checkpoint`` and ``load_checkpoint``; tools use ``ShardReader`` and
``write_full_checkpoint`` to read and write whole (unsharded) models by HF name.
"""
from megallama.checkpointing.files import (TRACKER, check_save_dir, checkpoint_dir, list_iterations,  # noqa: F401
                                           read_tracker, resolve_load_dir)
from megallama.checkpointing.save_load import (args_to_dict, check_compatible, check_writable,  # noqa: F401
                                               load_checkpoint, load_common, save_checkpoint)
from megallama.checkpointing.full import model_config_from_checkpoint, open_checkpoint  # noqa: F401
from megallama.checkpointing.sharded import ShardReader  # noqa: F401
from megallama.checkpointing.state import get_rng_state, set_rng_state  # noqa: F401
