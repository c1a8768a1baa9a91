"""tokenlab: token-level self-distillation for vision transformers.

Two published methods on one engine and one model zoo:

- STL, Fully Attentional Networks with Self-emerging Token Labeling (https://arxiv.org/abs/2401.03844),
  on FAN backbones (https://arxiv.org/abs/2204.12451);
- iBOT, masked image modelling with an online tokenizer (https://arxiv.org/abs/2111.07832).

Importing the package registers every tokenlab model with timm, so ``timm.create_model("fan_tiny_12_p16_224")``
works afterwards.
"""

from tokenlab import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
