"""2D ResNet-18 as in the MedMNIST experiments (torchvision's, with a stride-1 3x3 stem and no
max-pooling for 28-pixel images), the 2D counterpart of resnet18_3d for the MedMNIST recipe."""
import torch
import torch.nn as nn
from torchvision.models import resnet18

from .contract import ClassifierBase
from .registry import register_model


@register_model("resnet18_2d")
class ResNet2D(ClassifierBase):
    cam_layer = "net.layer4"

    def __init__(self, in_chans: int = 1, num_classes: int = 2):
        super().__init__()
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()
        self.spatial_dims = 2
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.net.avgpool(x).flatten(1)
        return x if pre_logits else self.net.fc(x)
