"""3D ResNet-18/50 as in the MedMNIST experiments: 3x3x3 convolutions throughout and a stride-1
3x3x3 stem without max-pooling (what their 2D->3D converted ResNets use on 28^3 and 64^3), built
from torchvision's video-ResNet blocks."""
import torch
import torch.nn as nn
from torchvision.models.video.resnet import BasicBlock, Bottleneck, Conv3DSimple, VideoResNet

from .contract import ClassifierBase
from .registry import register_model

LAYOUTS = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}


class MedMNISTStem(nn.Sequential):
    def __init__(self, in_chans: int):
        super().__init__(nn.Conv3d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False),
                         nn.BatchNorm3d(64), nn.ReLU(inplace=True))


@register_model("resnet50_3d", depth=50)
@register_model("resnet18_3d", depth=18)
class ResNet3D(ClassifierBase, VideoResNet):
    cam_layer = "layer4"

    def __init__(self, depth: int = 18, in_chans: int = 1, num_classes: int = 2):
        if depth not in LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got {depth}")
        block, layers = LAYOUTS[depth]
        super().__init__(block, [Conv3DSimple] * 4, layers, lambda: MedMNISTStem(in_chans), num_classes)
        self.spatial_dims = 3
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.fc(x)
