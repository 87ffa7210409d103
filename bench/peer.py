"""The peer: MoCo v3 built as the official code builds it (facebookresearch/moco-v3, moco/builder.py
MoCo_ViT, vits.py), written once here from that code's structure. The bench's peer rows
(`bench/model_step.py`) train it; the tests' independent references (tests/test_moco.py) use its
parts, so the bench and the tests can never hold two different "official" builds.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def official_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True):
    """MoCo._build_mlp of the official code, verbatim in structure."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def timm_vit(arch: str, img_size: int) -> nn.Module:
    """timm's ViT at MoCo v3's sizes (ViT-S with 12 heads), stop-gradient patch embedding."""
    import timm

    from fastmoco.models.vit import VIT_SIZES

    size = VIT_SIZES[arch]
    enc = timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                            patch_size=size.patch_size, embed_dim=size.embed_dim, depth=size.depth,
                            num_heads=size.num_heads)
    # vits.py of the official code: fixed sin-cos positions and a frozen patch projection.
    enc.pos_embed.requires_grad = False
    enc.patch_embed.proj.weight.requires_grad = False
    enc.patch_embed.proj.bias.requires_grad = False
    return enc


class PeerMoCo(nn.Module):
    """moco/builder.py's MoCo_ViT on a single GPU (concat_all_gather is the identity)."""

    def __init__(self, arch: str, img_size: int, dim: int, mlp_dim: int, T: float):
        super().__init__()
        self.T = T
        self.base_encoder = timm_vit(arch, img_size)
        hidden_dim = self.base_encoder.embed_dim
        self.base_encoder.head = official_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = official_mlp(2, dim, mlp_dim, dim)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for param_m in self.momentum_encoder.parameters():
            param_m.requires_grad = False

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long, device=logits.device)  # official: .cuda() of a host tensor
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m: float):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class PeerMoCoResNet(PeerMoCo):
    """moco/builder.py's MoCo_ResNet on a single GPU: torchvision trunk built as main_moco.py builds it
    (zero_init_residual), fc replaced by the 2-layer projector, a 2-layer predictor without the last BN;
    forward, momentum loop and loss are MoCo_ViT's (the official classes share them)."""

    def __init__(self, arch: str, dim: int, mlp_dim: int, T: float):
        import torchvision

        nn.Module.__init__(self)
        self.T = T
        self.base_encoder = getattr(torchvision.models, arch)(zero_init_residual=True)
        self.base_encoder.fc = official_mlp(2, self.base_encoder.fc.in_features, mlp_dim, dim)
        self.predictor = official_mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for param_m in self.momentum_encoder.parameters():
            param_m.requires_grad = False


# -- DINO, as its official code builds it (facebookresearch/dino main_dino.py, vision_transformer.py,
#    utils.py): the bench's DINO peer rows (bench/dino.py) ------------------------------------------------

class PeerDINOHead(nn.Module):
    """vision_transformer.DINOHead: MLP with GELU, L2 normalisation, weight-normalised last layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1, p=2))


class PeerMultiCropWrapper(nn.Module):
    """utils.MultiCropWrapper: consecutive crops of one resolution through the backbone together."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: list):
        sizes = torch.tensor([inp.shape[-1] for inp in x])
        idx_crops = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, output = 0, []
        for end in idx_crops.tolist():
            output.append(self.backbone(torch.cat(x[start:end])))
            start = end
        return self.head(torch.cat(output))


def peer_dino_loss(student_output, teacher_output, center, teacher_temp: float, ncrops: int,
                   student_temp: float = 0.1):
    """main_dino.DINOLoss.forward: every (teacher global i, student crop v != i) pair, unfused."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = nn.functional.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * nn.functional.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


class PeerDINO(nn.Module):
    """main_dino.train_dino's model on one GPU: timm ViTs (DINO's ViT, position embedding interpolated
    per resolution), student with drop path, teacher as a copy, the center as a buffer."""

    def __init__(self, arch: str, img_size: int, patch_size: int, num_heads: int, out_dim: int,
                 drop_path: float = 0.1):
        super().__init__()
        import timm

        from fastmoco.models.vit import VIT_SIZES

        size = VIT_SIZES[arch]

        def vit(rate):
            return timm.create_model(size.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                     patch_size=patch_size, embed_dim=size.embed_dim, depth=size.depth,
                                     num_heads=num_heads, drop_path_rate=rate, dynamic_img_size=True)

        self.student = PeerMultiCropWrapper(vit(drop_path), PeerDINOHead(size.embed_dim, out_dim))
        self.teacher = PeerMultiCropWrapper(vit(0.0), PeerDINOHead(size.embed_dim, out_dim))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, crops: list, teacher_temp: float):
        teacher_output = self.teacher(crops[:2])
        student_output = self.student(crops)
        loss = peer_dino_loss(student_output, teacher_output, self.center, teacher_temp, len(crops))
        with torch.no_grad():  # DINOLoss.update_center (one process: no all-reduce)
            batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
            self.center.mul_(0.9).add_(batch_center * 0.1)
        return loss

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """main_dino's EMA: a Python loop over the parameters."""
        for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def peer_clip_gradients(model: nn.Module, clip: float) -> None:
    """utils.clip_gradients: each parameter's gradient clipped to norm `clip` on its own."""
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
