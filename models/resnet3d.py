"""3D ResNet-18/50 as in the MedMNIST experiments: 3x3x3 convolutions throughout and a stride-1
3x3x3 stem without max-pooling (what their 2D->3D converted ResNets use on 28^3 and 64^3), built
from torchvision's video-ResNet blocks."""
import torch.nn as nn
from torchvision.models.video.resnet import BasicBlock, Bottleneck, Conv3DSimple, VideoResNet

from models.registry import register_model


class MedMNISTStem(nn.Sequential):
    def __init__(self, in_chans: int):
        super().__init__(nn.Conv3d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False),
                         nn.BatchNorm3d(64), nn.ReLU(inplace=True))


class ResNet3D(VideoResNet):
    def __init__(self, block, layers: list[int], in_chans: int = 1, num_classes: int = 2, **_ignored):
        super().__init__(block, [Conv3DSimple] * 4, layers, lambda: MedMNISTStem(in_chans), num_classes)
        self.spatial_dims = 3
        self.num_classes = num_classes
        self.config = {"in_chans": in_chans, "num_classes": num_classes, "spatial_dims": 3}

    def forward_features(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register_model
def resnet18_3d(**overrides) -> ResNet3D:
    return ResNet3D(BasicBlock, [2, 2, 2, 2], **overrides)


@register_model
def resnet50_3d(**overrides) -> ResNet3D:
    return ResNet3D(Bottleneck, [3, 4, 6, 3], **overrides)
