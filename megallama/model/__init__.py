from megallama.model.llama import LlamaForCausalLM, build_model  # noqa: F401
