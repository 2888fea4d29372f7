"""Front doors to the fused kernels. Each op has a PyTorch reference with the same signature; the fused
``megallama._C`` path is used when the extension is built, else the reference (one warning)."""
from megallama.ops.rms_norm import rms_norm  # noqa: F401
from megallama.ops.rope import apply_rope, rope_frequencies  # noqa: F401
from megallama.ops.swiglu import swiglu  # noqa: F401
