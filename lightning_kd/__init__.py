"""lightning_kd: knowledge distillation methods from the literature as PyTorch Lightning modules."""
from lightning_kd.core import DistillationModule, Step

__version__ = "0.1.0"
__all__ = ["DistillationModule", "Step", "__version__"]
