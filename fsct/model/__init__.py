"""PANet few-shot segmentation model: ResNet-18 encoder, prototypes, cosine logits, PAR loss."""

from fsct.model.encoder import ResNetEncoder
from fsct.model.panet import PANet, build_model, cosine_logits, masked_average

__all__ = ["PANet", "ResNetEncoder", "build_model", "cosine_logits", "masked_average"]
