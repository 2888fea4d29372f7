"""Front doors to the fused kernels. Each op has a PyTorch reference with the same signature; the fused
``torch.ops.megallama`` path (csrc/, loaded on first use by ``_extension``) is used when available, else the
reference (one warning). ``set_fused_kernels(False)`` (``--no-fused-kernels``) or ``MEGALLAMA_FUSED_KERNELS=0``
forces the references."""
from megallama.ops._extension import fused_kernels_enabled, kernel_source, set_fused_kernels  # noqa: F401
from megallama.ops._extension import load as load_fused_kernels  # noqa: F401
from megallama.ops.rms_norm import rms_norm  # noqa: F401
from megallama.ops.rope import apply_rope, apply_rope_qk, rope_frequencies  # noqa: F401
from megallama.ops.swiglu import swiglu, swiglu_packed  # noqa: F401
