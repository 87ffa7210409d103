"""ResNet trunks for MoCo v3 (the official code's `MoCo_ResNet`): torchvision's ResNet with
`zero_init_residual=True`, every BatchNorm over the global batch (the official code converts the model
with `convert_sync_batchnorm`; `GlobalBatchNorm2d` gives the same statistics on any backend, gloo
included), and torchvision's parameter names, so the trunk's state dict loads into
`torchvision.models.resnet50()` with only `fc` missing. MoCo puts its projector at `fc` (the official
name); `head` is that module under the name the rest of fastmoco reads.

    backbone = ResNet("resnet50")            # (B, 3, H, W) -> (B, 2048) pooled features with head=False

On CUDA the input is made channels_last (cuDNN's fast NHWC convolutions under bf16).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from fastmoco.models.heads import GlobalBatchNorm2d

# arch -> (block, layers); resnet18 keeps CPU tests small
RESNET_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d inside `module` replaced by a GlobalBatchNorm2d holding the same parameters
    and buffers (what convert_sync_batchnorm does with SyncBatchNorm)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            global_batchnorm(child)
    return module


class ResNet(TorchvisionResNet):
    """torchvision's ResNet trunk returning pooled features, (B, embed_dim); `fc` is the head."""

    def __init__(self, arch: str = "resnet50"):
        if arch not in RESNET_ARCHS:
            raise ValueError(f"arch {arch!r}: not a ResNet (known: {', '.join(RESNET_ARCHS)})")
        block, layers = RESNET_ARCHS[arch]
        super().__init__(block, layers, zero_init_residual=True)
        self.arch = arch
        self.embed_dim = self.fc.in_features
        self.fc = nn.Identity()  # MoCo installs its projector here
        global_batchnorm(self)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor, head: bool = True) -> torch.Tensor:  # (B, 3, H, W)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # (B, embed_dim)
        return self.fc(x) if head else x

    def backbone_state_dict(self) -> dict:
        """The trunk's weights in torchvision's names, without the head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("fc.")}
