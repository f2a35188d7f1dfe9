"""2D ResNet-18 as in the MedMNIST experiments (torchvision's, with a stride-1 3x3 stem and no
max-pooling for 28-pixel images), the 2D counterpart of resnet18_3d for the MedMNIST recipe."""
import torch.nn as nn
from torchvision.models import resnet18

from models.registry import register_model


class ResNet2D(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 2, **_ignored):
        super().__init__()
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.config = {"in_chans": in_chans, "num_classes": num_classes, "spatial_dims": 2}

    def forward_features(self, x):
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.avgpool(x).flatten(1)

    def forward(self, x):
        return self.net.fc(self.forward_features(x))


@register_model
def resnet18_2d(**overrides) -> ResNet2D:
    return ResNet2D(**overrides)
