"""The training engine: config loading, the generic trainer, checkpoints, distributed helpers, logging, schedules.

``load_config`` merges ``configs/default.yaml`` -> recipe -> ``key=value`` overrides and validates them; ``train``
builds data, model and method from the config and runs ``Trainer.fit``. The engine knows methods only through the
protocol in ``tokenlab.methods`` and never imports a concrete method.
"""

from tokenlab.engine.config import list_recipes, load_config
from tokenlab.engine.trainer import ResumableSampler, RunResult, Trainer, build_model, train

__all__ = ["ResumableSampler", "RunResult", "Trainer", "build_model", "list_recipes", "load_config", "train"]
