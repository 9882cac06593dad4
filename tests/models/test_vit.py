import torch

from moevlm.config import VisionConfig
from moevlm.models.vit import ViT


def test_cls_output_skips_work_but_equals_running_every_position():
    torch.manual_seed(0)
    vit = ViT(VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4, image_tokens="cls")).eval()
    images = torch.randn(3, 3, 16, 16)
    x = vit.patch_embed(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls.expand(3, -1, -1), x], dim=1) + vit.pos
    for block in vit.blocks:
        x = block(x)  # every position, the plain way
    torch.testing.assert_close(vit(images), vit.ln(x)[:, :1])
