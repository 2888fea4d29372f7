"""The seed's ``training_infra.distributed.microbatch_scheduler`` face (the implementation is in megallama.pipeline)."""
from megallama.pipeline.microbatch_scheduler import MicrobatchScheduler  # noqa: F401
