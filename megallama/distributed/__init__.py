"""The seed's ``training_infra.distributed`` face: layouts and the manual trainer (see ``megallama.api``)."""
from megallama.api import (ConfigurationFactory, DistributedConfig, DistributedTrainer,  # noqa: F401
                           create_distributed_trainer)
from megallama.pipeline.microbatch_scheduler import MicrobatchScheduler  # noqa: F401
