"""The networks: the causal Wan DiT (:mod:`.model`), its 3D RoPE (:mod:`.rope`), the
attention dispatch over backends (:mod:`.attention`), the block-causal frame masks
(:mod:`.masks`, a leaf: the Triton kernels import it) and the bridge to those kernels
(:mod:`.kernels_bridge`). Nothing here imports the engine."""
