"""How memory becomes weights: the GenerativeAdapter engine (arXiv 2411.05877).

Knows nothing of users or databases: it turns token windows into an AdapterState and answers
with a frozen causal LM adapted by one state per batch row.
"""

from .base_model import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_base_model
from .memory.config import ConfigError, GeneratorConfig
from .memory.export import export_peft
from .memory.model import GenerativeAdapterModel
from .memory.state import AdapterState, StateError

__all__ = [
    "DEFAULT_MODEL", "AdapterState", "ConfigError", "GenerativeAdapterModel", "GeneratorConfig",
    "LoadedModel", "ModelLoadError", "StateError", "export_peft", "load_base_model",
]
