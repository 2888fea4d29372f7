"""The seed's ``training_infra.models.llama`` face: ``create_llama_7b_parallel`` and the model classes."""
from megallama.api import ParallelLlamaModel, create_llama_7b_parallel  # noqa: F401
from megallama.model import LlamaForCausalLM, build_model  # noqa: F401
