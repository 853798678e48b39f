"""The fusion transformer learns a text-conditioned choice in seconds: what the synthetic world needs of it.

Run: python -m pytest -q tests/test_learning.py
Two objects, told apart only by colour, and the word "red" or "blue": a model that ignores the text picks the
named one at most half of the time. The visual branch is left out (fuse() takes its tokens directly) so that the
test isolates the fusion, the [REG] token, the text path and the box head, at a few seconds of CPU.
"""
import pytest
import torch
from torchvision.ops import box_convert, box_iou

from losses import total_loss
from model import GroundingModel, ModelConfig

D = 32


def two_objects(n: int, g: torch.Generator, red: int, blue: int, tok) -> tuple:
    """n scenes of a 2x2 token grid, a red and a blue object in two random cells; token = [is red, is blue,
    box cxcywh] scaled to norm ~sqrt(D), the size of a DETR encoder's LayerNorm'd output. Returns the visual tokens
    (n,4,D), token ids (n,3), the named object's box and the other one's (n,4) normalised cxcywh."""
    cells = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])  # (n,2): red's cell, blue's
    boxes = 0.35 + 0.3 * torch.rand(n, 2, 4, generator=g)  # inside its cell: centre and size, in cell units
    boxes[..., :2] = (torch.stack([cells % 2, cells // 2], -1) + boxes[..., :2]) / 2
    boxes[..., 2:] /= 2
    vis = torch.zeros(n, 4, D)
    rows = torch.arange(n)
    for k in range(2):
        vis[rows, cells[:, k], k] = 1
        vis[rows, cells[:, k], 2:6] = boxes[:, k]
    say_red = torch.rand(n, generator=g) < 0.5
    ids = torch.tensor([[tok.cls_token_id, red if r else blue, tok.sep_token_id] for r in say_red.tolist()])
    named = torch.where(say_red[:, None], boxes[:, 0], boxes[:, 1])
    other = torch.where(say_red[:, None], boxes[:, 1], boxes[:, 0])
    return D ** 0.5 * vis, ids, named, other


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fusion_learns_which_object_a_colour_word_names(shapes_tok, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", imsize=64, hidden_dim=D, nheads=2, dim_feedforward=2 * D, dropout=0.0,
                      enc_layers=0, vl_layers=3, max_query_len=3, pos_std=0.02, text_encoder="unused",
                      text_init="random", text_config={"hidden_size": D, "num_hidden_layers": 1,
                                                       "num_attention_heads": 2, "intermediate_size": 2 * D,
                                                       "max_position_embeddings": 8, "vocab_size": len(shapes_tok)})
    model = GroundingModel(cfg)  # imsize 64 at stride 32: the 2x2 grid of visual tokens
    red, blue = shapes_tok.convert_tokens_to_ids(["red", "blue"])
    no_pad = torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)

    def predict(vis, ids):
        txt = model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model.fuse(vis, no_pad[0].expand(len(vis), -1), txt, no_pad[1].expand(len(ids), -1))[0]

    fusion = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "input_proj."))]
    optimizer = torch.optim.AdamW(fusion, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        vis, ids, named, _ = two_objects(64, g, red, blue, shapes_tok)
        loss, _ = total_loss(predict(vis, ids), named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vis, ids, named, other = two_objects(1000, torch.Generator().manual_seed(100 + seed), red, blue, shapes_tok)
    with torch.no_grad():
        pred = box_convert(predict(vis, ids), "cxcywh", "xyxy")
    iou_named = box_iou(pred, box_convert(named, "cxcywh", "xyxy")).diagonal()
    iou_other = box_iou(pred, box_convert(other, "cxcywh", "xyxy")).diagonal()
    chose_named = (iou_named > iou_other).float().mean().item()  # a text-blind model: 0.5 in expectation
    assert chose_named > 0.95, chose_named
    assert (iou_named >= 0.5).float().mean() > 0.6  # and it boxes it: Acc@0.5 (0.95-1.0 over 9 seeds; 0.74-0.90 with pos_std 1)
