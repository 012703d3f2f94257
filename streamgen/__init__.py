"""streamgen: real-time streaming video generation with distilled autoregressive diffusion."""
from .config import ActionSpace, CacheConfig, ModelConfig, PipelineConfig, SamplerConfig
from .errors import ActionError, CheckpointError, ConfigError, PromptError, StreamgenError

__version__ = "0.1.0"

__all__ = ["ActionSpace", "CacheConfig", "ModelConfig", "PipelineConfig", "SamplerConfig",
           "Pipeline", "Session", "StreamgenError", "ConfigError", "CheckpointError",
           "ActionError", "PromptError", "__version__"]


def __getattr__(name):  # lazy: importing streamgen stays cheap
    if name in ("Pipeline", "Session"):
        from .engine import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)
