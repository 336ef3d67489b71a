"""Seed 004's architectures that torchvision does not ship, one file per family (core/models/<family>.py).

ZOO maps a registry name to (builder, minimum input side). A builder returns (backbone, feature count);
ImageClassifier adds the head.
"""

from core.models.cyclemlp import cyclemlp_b1, cyclemlp_tiny
from core.models.darknet import darknet53
from core.models.lenet import lenet_bn
from core.models.mixer import mixer_s16, mixer_tiny
from core.models.mobilenet_v1 import mobilenet_v1, mobilenet_v1_050
from core.models.nin import nin
from core.models.senet import se_resnet18
from core.models.vit import vit_tiny
from core.models.xception import xception

ZOO = {
    "nin": (nin, 8),
    "lenet_bn": (lenet_bn, 16),
    "se_resnet18": (se_resnet18, 8),
    "mixer_tiny": (mixer_tiny, 8),
    "mixer_s16": (mixer_s16, 16),
    "mobilenet_v1": (mobilenet_v1, 32),
    "mobilenet_v1_050": (mobilenet_v1_050, 32),
    "xception": (xception, 32),
    "darknet53": (darknet53, 32),
    "vit_tiny": (vit_tiny, 8),
    "cyclemlp_tiny": (cyclemlp_tiny, 32),
    "cyclemlp_b1": (cyclemlp_b1, 32),
}
