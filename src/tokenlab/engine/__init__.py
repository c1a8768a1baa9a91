"""The training engine: config loading, the generic trainer, builders, checkpoints.

``load_config`` merges ``configs/default.yaml`` -> recipe -> ``key=value`` overrides and validates them; ``train``
builds the data of the method's data view, the model and the method from the config (``engine.builders``) and runs
``Trainer.fit``. The engine knows methods only through the protocol in ``tokenlab.methods`` and never imports a
concrete method.
"""

from tokenlab.engine.builders import build_model
from tokenlab.engine.config import list_recipes, load_config
from tokenlab.engine.trainer import RunResult, Trainer, train

__all__ = ["RunResult", "Trainer", "build_model", "list_recipes", "load_config", "train"]
