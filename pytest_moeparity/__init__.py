"""pytest-moeparity: find where a GPU Qwen3-MoE forward first disagrees with its CPU reference."""
from .contract import S, parse_key, stage_contract, trace_key
from .model import GGUFModel, ModelError, Qwen3MoeConfig, load_model
from .plan import PlanError, SavePlan
from .trace import Recorder, Trace

__version__ = "0.1.0"

__all__ = ["S", "GGUFModel", "ModelError", "PlanError", "Qwen3MoeConfig", "Recorder", "SavePlan", "Trace",
           "load_model", "parse_key", "stage_contract", "trace_key", "__version__"]
