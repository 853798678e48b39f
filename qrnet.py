"""QRNet's visual branch: Swin with query-aware dynamic attention (QD-ATT) and the query-aware multiscale neck.

    image (B,3,S,S) -> patch embedding (stride 4)
      stage s = 0..3: Swin blocks -> QD-ATT_s(x, query) -> stage norm_s -> C_s (B,c_s,h,w)
                      (patch merging takes the gated, un-normed x: the query's gating reaches every later stage)
    C_0..C_3 -> lateral 1x1 convs to D -> top-down: L_{i-1} += nearest(L_i)
             -> bottom-up: O_0 = L_0 (not gated), O_{i+1} = L_{i+1} + AvgDown(QD-ATT'_i(O_i, query))
             -> O_4 = O_3[::2, ::2], the extra stride-64 level
    O_3 (stride 32) and O_4 (stride 64), each plus a learned scale embedding, are what the fusion reads (400 + 100
    tokens on a 640 canvas).

QRNet's Swin-S has 4 stages; a Swin of 3 (the synthetic world's 64 px canvas) runs the same code one level shorter.
The query is BERT's last-layer [CLS] (B,Q), not detached: QD-ATT's gradient reaches BERT (model.py passes it).
QD-ATT is CBAM's channel-then-spatial gating with weights generated from the query (DynamicLinear). Its V starts at
zero, so at initialisation every dynamic layer outputs 0, both gates are sigmoid(0) = 1/2 and QD-ATT is a constant
gain of 1/4; the LayerNorms after it (stage norm, patch merging) all but cancel that.

References
  Ye et al., Shifting More Attention to Visual Backbone: Query-modulated Refinement Networks for End-to-End Visual
  Grounding, CVPR 2022 (arXiv 2203.15442), sec. 3.
  QRNet, github.com/LukeForeverYoung/QRNet @ 6aaa23c: models/dynamic_attention/*.py, models/trans_vg.py (TransVGSwin),
  models/swin_model/mmdet/models/backbones/swin_transformer.py (MuSwinTransformer), .../necks/MuFPN.py
  (NoFpnSoftDownSample, the neck its --soft_fpn default selects).
  torchvision.models.swin_transformer: the Swin blocks and patch merging, with their weights, as they are.

Shape letters: B batch, S canvas side, h x w a level's map, c a stage's width, D the neck's width (the fusion width),
Q the query's width (BERT's, 768).

Equal to the official code (tests/test_qrnet.py's parity test): torchvision's Swin blocks give mmdet's stage outputs
bit for bit at 640 px (same window masks, same patch-merging order); the official Swin always shifts odd blocks while
torchvision skips the shift when one window covers the whole map, which only happens on canvases under ~224 px.
The canvas side must be a multiple of the deepest stage's stride, 32 (16 for 3 stages): the official neck fails on
odd maps. Left out, as they never run: the detector's RPN head, which QRNet keeps, and 3 of its 5 scale embeddings
(only rows 3 and 4 are read). The channel gate's dynamic weights are generated once for both of its pools (the
official code does it per pool). machinery/interop.py maps the official (mmdet) names of these tensors, a Mask R-CNN
Swin-S's and QRNet's own, to ours. This file imports nothing from the project.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import SwinTransformer

# Swin sizes by backbone name (ModelConfig.swin overrides them). swin_s_qrnet: QRNet's, the Mask R-CNN Swin-S it
# starts from (drop-path 0.2 over the 24 blocks). swin_toy_qrnet: for the synthetic world on a laptop CPU, 3 stages as
# its TransVG toy has 3 ResNet layers (64 px canvas: maps 16/8/4, windows of 4, so no stage is padded and stages 1-2
# shift; widths 32-128), started from a toy Mask R-CNN Swin (toy.build_toy_swin; docs/qrnet.md says what it learns).
SWIN_SIZES = {
    "swin_s_qrnet": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                     "drop_path": 0.2},
    "swin_toy_qrnet": {"embed_dim": 32, "depths": [2, 2, 2], "num_heads": [1, 2, 4], "window_size": 4,
                       "drop_path": 0.1},
}

STAGES = (4, 3)  # Swin stages the branch runs: QRNet's 4, or 3 (one level shorter)


def deepest_stride(depths: list[int]) -> int:
    """The stride of a Swin's last stage (4 at the patch embedding, x2 at each merge): 32 for Swin-S, 16 for 3 stages.
    The canvas side must be a multiple of it, and the fusion reads its level and the one below (twice the stride)."""
    return 4 * 2 ** (len(depths) - 1)

# -----------------------------------------------------------------------------
# query-aware dynamic attention


def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B,...,in), weight (B,in,out), bias (B,out) -> (B,...,out): each sample through its own linear map."""
    B, inner = x.shape[0], x.shape[1:-1]  # inner: the token dims, () for a pooled (B,in)
    y = x.reshape(B, -1, weight.shape[1]) @ weight  # (B,tokens,out)
    return y.view(B, *inner, -1) + bias.view(B, *(1,) * len(inner), -1)


class DynamicLinear(nn.Module):
    """A linear layer whose weight and bias are generated from a query t: [W(t); b(t)] = U(t) V, with
    U(t) = Linear(t) viewed as (in+1, rank) and V (rank, out) learned, initialised to zero (the official init).

    x (B,...,in), query (B,Q) -> (B,...,out) = x W(t) + b(t), each sample with its own weights."""

    def __init__(self, in_dim: int, out_dim: int, query_dim: int, rank: int = 30) -> None:
        super().__init__()
        self.in_dim, self.rank = in_dim, rank
        self.decoder = nn.Linear(query_dim, (in_dim + 1) * rank)  # U(t), row-major: U[i, j] = output i * rank + j
        self.V = nn.Parameter(torch.zeros(rank, out_dim))

    def weights(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W(t) (B,in,out), b(t) (B,out)) for queries (B,Q)."""
        U = self.decoder(query).view(query.shape[0], self.in_dim + 1, self.rank)  # (B,in+1,rank)
        P = U @ self.V  # (B,in+1,out): rows 0..in-1 the weight, the last row the bias
        return P[:, :-1], P[:, -1]

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return dynamic_linear(x, *self.weights(query))


class QueryDynamicAttention(nn.Module):
    """QD-ATT: tokens x (B,N,c) gated by the query (B,Q) -> (B,N,c).

    Channel gate (CBAM with dynamic layers): sigmoid(MLP(mean of x over tokens) + MLP(max over tokens)), one MLP,
    DL(c -> c/16) -> ReLU -> DL(c/16 -> c), shared by both pools. Then the spatial gate, sigmoid(DL(c -> 1)) per token.
    The pools run over every token, letterbox padding included, as in the official code."""

    def __init__(self, dim: int, query_dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel_down = DynamicLinear(dim, dim // reduction, query_dim)
        self.channel_up = DynamicLinear(dim // reduction, dim, query_dim)
        self.spatial = DynamicLinear(dim, 1, query_dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # the MLP's weights are generated once for both pools (the official code generates them per pool: the same
        # numbers, twice the reads of the largest decoders and twice their weight gradients)
        down, up = self.channel_down.weights(query), self.channel_up.weights(query)

        def mlp(pooled: torch.Tensor) -> torch.Tensor:  # (B,c) -> (B,c)
            return dynamic_linear(F.relu(dynamic_linear(pooled, *down)), *up)

        x = x * (mlp(x.mean(1)) + mlp(x.amax(1))).sigmoid()[:, None]  # channel gate, (B,1,c)
        return x * self.spatial(x, query).sigmoid()  # spatial gate, (B,N,1)


# -----------------------------------------------------------------------------
# the visual branch: Swin + QD-ATT, then the neck


def avg_down(x: torch.Tensor) -> torch.Tensor:
    """(B,h,w,D) -> (B,h/2,w/2,D), the mean of each 2x2 cell. Summed in the official order (row parity fastest), then
    x 0.25: bit-equal to the official mean of the four sub-grids, which F.avg_pool2d is not (by up to 2e-7)."""
    return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) * 0.25


class QueryNeck(nn.Module):
    """The query-aware multiscale neck: stage outputs [(B,c_s,h,w)] x 4 and the query -> levels O_0..O_4, (B,D,h,w)
    at strides 4, 8, 16, 32 and 64 (see the file's docstring; one fewer of each for a 3-stage Swin). Only its lateral
    convs exist in a detector."""

    def __init__(self, in_widths: list[int], dim: int, query_dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_widths)
        self.qdatt = nn.ModuleList(QueryDynamicAttention(dim, query_dim) for _ in in_widths[1:])
        for conv in self.lateral:  # mmdet's FPN init (xavier, zero bias); the QD-ATT decoders keep PyTorch's default
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def top_down(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """The lateral convs and the top-down sums, [(B,D,h,w)] per stage: what a detector's FPN computes before its 3x3
        output convs (toy.build_toy_swin trains them so)."""
        laterals = [conv(x) for conv, x in zip(self.lateral, stages)]  # (B,D,h,w) each
        for i in range(len(laterals) - 1, 0, -1):  # top-down; sizes halve exactly, so nearest = each cell 2x2 times
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        return laterals

    def forward(self, stages: list[torch.Tensor], query: torch.Tensor) -> list[torch.Tensor]:
        laterals = self.top_down(stages)
        levels = [laterals[0]]
        for qdatt, lateral in zip(self.qdatt, laterals[1:]):  # bottom-up, in sequence: O_1 is gated with its sum
            B, D, h, w = levels[-1].shape
            tokens = levels[-1].permute(0, 2, 3, 1).reshape(B, h * w, D)  # (B,h*w,D), row-major
            gated = qdatt(tokens, query).view(B, h, w, D)
            levels.append(lateral + avg_down(gated).permute(0, 3, 1, 2))
        levels.append(levels[-1][..., ::2, ::2])  # stride 64: the official max_pool2d with kernel 1 and stride 2
        return levels


class QRNetVisual(nn.Module):
    """QRNet's visual branch: Swin (torchvision's blocks) with QD-ATT after the last block of each stage, per-stage
    output LayerNorms, the query-aware neck of width D, and the scale embeddings of the two levels the fusion reads.
    sizes: a SWIN_SIZES entry. forward(images (B,3,S,S), img_is_pad (B,S,S) True = padding, query (B,Q)) ->
      tokens (B,N,D): the stride-32 then the stride-64 level, row-major, each plus its scale embedding (QRNet adds it
                      before visu_proj); N = n^2 + ceil(n/2)^2 with n = S/32 (400 + 100 at 640); a 3-stage Swin:
                      strides 16 and 32, n = S/16
      tokens_is_pad (B,N): True where the cell's top-left pixel is padding (nearest resize: QRNet's rule, TransVG's)
      last_stage (B,c,h,w): Swin's last stage's output (stage 4 of Swin-S)."""

    def __init__(self, sizes: dict, dim: int, query_dim: int) -> None:
        super().__init__()
        if len(sizes["depths"]) not in STAGES:
            raise ValueError(f"QRNet's visual branch needs a Swin of 4 stages (or 3), got depths {sizes['depths']}")
        w = sizes["window_size"]
        swin = SwinTransformer(patch_size=[4, 4], embed_dim=sizes["embed_dim"], depths=sizes["depths"],
                               num_heads=sizes["num_heads"], window_size=[w, w],
                               stochastic_depth_prob=sizes["drop_path"])  # block i of n drops with p * i / (n - 1)
        self.patch_embed = swin.features[0]  # conv 4x4 stride 4 -> NHWC -> LayerNorm
        self.stages = nn.ModuleList(swin.features[1::2])  # each stage's Swin blocks, (B,h,w,c) -> (B,h,w,c)
        self.merges = nn.ModuleList(swin.features[2::2])  # patch merging, (B,h,w,c) -> (B,h/2,w/2,2c)
        self.widths = [sizes["embed_dim"] * 2**s for s in range(len(self.stages))]  # c_s: 96 ... 768 for Swin-S
        self.strides = [4 * 2**s for s in range(len(self.stages))]  # the stages' (and laterals'): 4 ... 32 for Swin-S
        self.qdatt = nn.ModuleList(QueryDynamicAttention(c, query_dim) for c in self.widths)
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.widths)  # the detector's norm0..norm3 (or 2)
        for m in self.qdatt.modules():  # the official backbone init covers its QD-ATT: trunc_normal(.02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.neck = QueryNeck(self.widths, dim, query_dim)
        self.scale_embed = nn.Parameter(torch.randn(2, dim))  # QRNet's rows 3, 4 of 5 (0-2 never read); N(0,1)
        self.cnn_channels = self.widths[-1]  # C of the last map it returns: Swin's last stage

    def num_tokens(self, imsize: int) -> int:
        n = imsize // self.strides[-1]
        return n * n + ((n + 1) // 2) ** 2  # the last two levels: 400 + 100 for Swin-S on a 640 canvas

    def forward(self, images: torch.Tensor, img_is_pad: torch.Tensor, query: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stages, levels = self.features(images, query)
        fused = levels[-2:]  # the deepest stage's level and the extra one: strides 32 and 64 for Swin-S
        tokens = torch.cat([x.flatten(2).transpose(1, 2) + e for x, e in zip(fused, self.scale_embed)], dim=1)
        is_pad = [F.interpolate(img_is_pad[:, None].float(), size=x.shape[-2:]).flatten(1).bool() for x in fused]
        return tokens, torch.cat(is_pad, dim=1), stages[-1]

    def features(self, images: torch.Tensor, query: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(stage outputs [(B,c_s,h,w)] x 4, neck levels [(B,D,h,w)] x 5; 3 and 4 for a 3-stage Swin)."""
        stages = self.stage_outputs(images, query)
        return stages, self.neck(stages, query)

    def stage_outputs(self, images: torch.Tensor, query: torch.Tensor | None) -> list[torch.Tensor]:
        """Swin's stage outputs [(B,c_s,h,w)] per stage, each stage gated by QD-ATT; query None: without QD-ATT, the
        Swin of the detector QRNet starts from (toy.build_toy_swin)."""
        x = self.patch_embed(images)  # (B,S/4,S/4,c_0)
        stages = []
        for s, blocks in enumerate(self.stages):
            x = blocks(x)
            B, h, w, c = x.shape
            if query is not None:
                x = self.qdatt[s](x.reshape(B, h * w, c), query).view(B, h, w, c)
            stages.append(self.stage_norms[s](x).permute(0, 3, 1, 2).contiguous())  # (B,c,h,w)
            if s < len(self.merges):
                x = self.merges[s](x)
        return stages
