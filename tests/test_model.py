"""model.py: shapes, gradients, masks, our checkpoints (both students), the distillation locations, that its fusion
learns a text-conditioned choice, and parity with the official TransVG code.

Run: python -m pytest -q tests/test_model.py
(The parity test needs the official code's outputs: its docstring says how to make them.)
"""
import math
import os
from dataclasses import asdict

import pytest
import torch
from conftest import TINY_SWIN
from test_machinery_interop import detr_checkpoint
from torchvision.ops import FrozenBatchNorm2d, box_convert, box_iou

from losses import total_loss
from machinery.checkpoints import FORMAT_VERSION
from machinery.flags import UsageError
from machinery.interop import load_model, load_visual_checkpoint
from model import LOCATIONS, GroundingModel, ModelConfig, example_inputs, sine_position_embedding


def test_output_shapes_keys_and_range(model):
    out = model(**example_inputs(model.cfg))
    assert out["pred_boxes"].shape == (3, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert set(out["distill"]) == {"loc1", "loc2", "loc3", "loc4"}
    for loc, (v, t) in out["distill"].items():
        assert (v.shape[1], t.shape[1]) == model.distill_widths(loc), loc
        assert v.shape[0] == t.shape[0] == 3 and torch.isfinite(v).all() and torch.isfinite(t).all()
    assert model.distill_widths("loc4") == (512, 64)  # ResNet-18 channels, BERT width


def test_a_resnet_without_layer4_gives_stride_16_tokens(tiny_config):
    model = GroundingModel(tiny_config(resnet_stages=3))  # the synthetic world's preset: 4x4 tokens at 64 px
    assert model.visual.stride == 16 and model.num_visual == 16 and not hasattr(model.visual.backbone, "layer4")
    out = model(**example_inputs(model.cfg))
    assert out["distill"]["loc4"][0].shape == (3, 256) == (3, model.distill_widths("loc4")[0])  # layer3's channels


def test_distill_locations_read_the_documented_tokens(model):
    captured = {}
    model.fusion.register_forward_hook(lambda m, i, o: captured.__setitem__("fusion", o))
    model.visual.encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("visual", o))
    out = model(**example_inputs(model.cfg))
    fused, n = captured["fusion"], model.num_visual
    assert n == (64 // 32) ** 2 and fused.shape[1] == 1 + n + model.cfg.max_query_len
    assert torch.equal(out["distill"]["loc1"][0], fused[:, 1])  # first visual token [VLS]
    assert torch.equal(out["distill"]["loc1"][1], fused[:, 1 + n])  # [CLS], first text token
    assert torch.equal(out["distill"]["loc3"][0], captured["visual"][:, 0])
    assert list(out["distill"]) == list(LOCATIONS)  # every location the flags offer, and no other
    for loc, (visual, text) in out["distill"].items():  # each of the width the teacher is pooled to
        assert (visual.shape[1], text.shape[1]) == model.distill_widths(loc), loc


def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_do_not(tiny_config):
    torch.manual_seed(0)
    model = GroundingModel(tiny_config()).train()
    out = model(**example_inputs(model.cfg))
    loss, _ = total_loss(out["pred_boxes"], torch.full((3, 4), 0.3))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("visual.backbone.conv1", "visual.backbone.layer1")) for n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    bns = [m for m in model.visual.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and all(not list(m.parameters()) for m in bns)  # statistics and affine are buffers


def test_text_padding_and_batch_composition_do_not_change_a_prediction(model):
    images, img_is_pad, input_ids, attention_mask = example_inputs(model.cfg).values()
    ref = model(images, img_is_pad, input_ids, attention_mask)["pred_boxes"]
    garbage = input_ids.clone()
    garbage[0, 4:] = 7  # ids under attention_mask == 0 must not matter
    assert torch.allclose(model(images, img_is_pad, garbage, attention_mask)["pred_boxes"], ref, atol=1e-6)
    alone = model(images[1:2], img_is_pad[1:2], input_ids[1:2], attention_mask[1:2])["pred_boxes"]
    assert torch.allclose(alone, ref[1:2], atol=1e-6)


def test_sine_position_is_normalised_over_the_valid_region():
    full = sine_position_embedding(torch.zeros(1, 3, 4, dtype=torch.bool), 8)  # (1,12,8)
    padded = torch.zeros(1, 5, 6, dtype=torch.bool)
    padded[:, 3:, :] = True
    padded[:, :, 4:] = True
    pos = sine_position_embedding(padded, 8).view(1, 5, 6, 8)
    assert torch.allclose(pos[:, :3, :4].reshape(1, 12, 8), full, atol=1e-6)
    # hand value: cell (row 1, col 2) of the 3x4 map; y = 2/3 * 2pi, x = 3/4 * 2pi; channel 0 = sin(y), 4 = sin(x)
    cell = full.view(3, 4, 8)[1, 2]
    assert cell[0].item() == pytest.approx(math.sin(2 / 3 * 2 * math.pi), abs=1e-5)
    assert cell[1].item() == pytest.approx(math.cos(2 / 3 * 2 * math.pi), abs=1e-5)
    assert cell[4].item() == pytest.approx(math.sin(3 / 4 * 2 * math.pi), abs=1e-5)


def test_wrong_input_sizes_are_refused(model):
    images, img_is_pad, input_ids, attention_mask = example_inputs(model.cfg).values()
    with pytest.raises(ValueError, match="64x64"):
        model(images[..., :32], img_is_pad[..., :32], input_ids, attention_mask)
    with pytest.raises(ValueError, match="8 tokens"):
        model(images, img_is_pad, input_ids[:, :5], attention_mask[:, :5])


# -----------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("backbone", ["resnet18", "swin_toy_qrnet"])
def test_our_checkpoint_round_trips_bit_exactly_and_an_older_format_is_refused(backbone, tiny_config, tmp_path):
    torch.manual_seed(0)
    model = GroundingModel(tiny_config(backbone=backbone, swin=dict(TINY_SWIN) if "swin" in backbone else None)).eval()
    with torch.no_grad():  # no zero-initialised tensor (QRNet's QD-ATT V) left to hide a tensor that was not loaded
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = example_inputs(model.cfg)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "format_version": FORMAT_VERSION},
               tmp_path / "ckpt.pt")
    again = GroundingModel.from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert not again.training and again.cfg == model.cfg and again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(**x)["pred_boxes"], again(**x)["pred_boxes"])
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "format_version": 2, "git_sha": "f00"},
               tmp_path / "old.pt")
    with pytest.raises(UsageError, match="old.pt: written by a train.py of checkpoint format 2 \\(git f00\\)"):
        GroundingModel.from_checkpoint(str(tmp_path / "old.pt"))


def test_trainable_bn_trains_every_backbone_layer_and_still_loads_detr(tiny_config, tmp_path):
    torch.manual_seed(1)
    source = GroundingModel(tiny_config())
    torch.save(detr_checkpoint(source), tmp_path / "detr.pth")
    model = GroundingModel(tiny_config(trainable_bn=True)).train()
    load_visual_checkpoint(model, str(tmp_path / "detr.pth"))
    assert all(p.requires_grad for p in model.parameters())
    backbone = model.visual.backbone
    assert isinstance(backbone.bn1, torch.nn.BatchNorm2d)
    assert torch.equal(backbone.bn1.running_var, source.visual.backbone.bn1.running_var)  # FrozenBN stats -> BN
    out = model(**example_inputs(model.cfg))
    total_loss(out["pred_boxes"], torch.full((3, 4), 0.3))[0].backward()
    assert backbone.conv1.weight.grad is not None and backbone.bn1.weight.grad is not None


def _two_objects(n: int, g: torch.Generator, red: int, blue: int, tok) -> tuple:
    """n scenes of a 2x2 token grid, a red and a blue object in two random cells; token = [is red, is blue,
    box cxcywh] scaled to norm ~sqrt(32), the size of a DETR encoder's LayerNorm'd output. Returns the visual tokens
    (n,4,32), token ids (n,3), the named object's box and the other one's (n,4) normalised cxcywh."""
    cells = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])  # (n,2): red's cell, blue's
    boxes = 0.35 + 0.3 * torch.rand(n, 2, 4, generator=g)  # inside its cell: centre and size, in cell units
    boxes[..., :2] = (torch.stack([cells % 2, cells // 2], -1) + boxes[..., :2]) / 2
    boxes[..., 2:] /= 2
    vis = torch.zeros(n, 4, 32)
    rows = torch.arange(n)
    for k in range(2):
        vis[rows, cells[:, k], k] = 1
        vis[rows, cells[:, k], 2:6] = boxes[:, k]
    say_red = torch.rand(n, generator=g) < 0.5
    ids = torch.tensor([[tok.cls_token_id, red if r else blue, tok.sep_token_id] for r in say_red.tolist()])
    named = torch.where(say_red[:, None], boxes[:, 0], boxes[:, 1])
    other = torch.where(say_red[:, None], boxes[:, 1], boxes[:, 0])
    return 32 ** 0.5 * vis, ids, named, other


def test_the_fusion_learns_which_object_a_colour_word_names(shapes_tok):
    # Two objects told apart only by colour, the word "red" or "blue": a model that ignores the text picks the
    # named one half of the time. fuse() takes the visual tokens directly: the fusion, [REG], the text path and the
    # box head, in seconds.
    seed = 0
    torch.manual_seed(seed)
    D = 32
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

    fusion = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    optimizer = torch.optim.AdamW(fusion, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        vis, ids, named, _ = _two_objects(64, g, red, blue, shapes_tok)
        loss, _ = total_loss(predict(vis, ids), named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vis, ids, named, other = _two_objects(1000, torch.Generator().manual_seed(100 + seed), red, blue, shapes_tok)
    with torch.no_grad():
        pred = box_convert(predict(vis, ids), "cxcywh", "xyxy")
    iou_named = box_iou(pred, box_convert(named, "cxcywh", "xyxy")).diagonal()
    iou_other = box_iou(pred, box_convert(other, "cxcywh", "xyxy")).diagonal()
    chose_named = (iou_named > iou_other).float().mean().item()  # a text-blind model: 0.5 in expectation
    assert chose_named > 0.95, chose_named
    assert (iou_named >= 0.5).float().mean() > 0.6  # and it boxes it: Acc@0.5 (0.95-1.0 over 11 seeds; 0.74-0.90 with pos_std 1)


# -----------------------------------------------------------------------------
# parity with the official TransVG code

# The reference files come from running the official code (github.com/djiajunustc/TransVG @ c862427, random weights,
# CPU, torch.manual_seed(0) before build_model): TransVG_random_{r50,r101,r50_q40}.pth (its train.py checkpoint format)
# and io.pt / io_r101.pt / io_q40.pt holding one batch of 2 eval-transformed samples (img, img_mask 1 = pad, word_id,
# word_mask), its pred_boxes, and the VL transformer's output (intermediates["vl_out"], sequence-first). Without them
# the test is skipped, saying so: CI has no copy of the official code. To make them (2 cores, a few minutes; nothing of
# the official code enters this project), the scripts in ../shared/tools/transvg_reference/ (its README) extract the
# official snapshot to a scratch folder, install its two extra packages and import it at run time:
#     bash ../shared/tools/transvg_reference/setup_transvg.sh <git dir of github.com/djiajunustc/TransVG>
#     python ../shared/tools/transvg_reference/make_reference.py      # writes the files above into $TRANSVG_REF
TRANSVG_REF = os.environ.get("TRANSVG_REF", "/tmp/transvg_ref")


@pytest.mark.slow
@pytest.mark.parametrize("ckpt,io", [("TransVG_random_r50.pth", "io.pt"), ("TransVG_random_r101.pth", "io_r101.pt"),
                                     ("TransVG_random_r50_q40.pth", "io_q40.pt")])
def test_same_outputs_as_official_transvg(ckpt, io):
    if not os.path.isfile(os.path.join(TRANSVG_REF, io)):
        pytest.skip(f"no official TransVG reference outputs in {TRANSVG_REF} (the comment above says how to make "
                    f"them; not in CI)")
    model = load_model(os.path.join(TRANSVG_REF, ckpt))
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # the file records torch.__version__
        ref = torch.load(os.path.join(TRANSVG_REF, io), weights_only=True)
    captured = {}
    model.fusion.register_forward_hook(lambda m, i, o: captured.__setitem__("fusion", o))
    with torch.no_grad():
        out = model(ref["img"], ref["img_mask"].bool(), ref["word_id"], ref["word_mask"])
    assert (out["pred_boxes"] - ref["pred_boxes"]).abs().max().item() <= 1e-4
    # random weights leave the boxes near 0.5 whatever the input, so compare every fusion output token as well,
    # after putting ours back into TransVG's [REG, text, visual] order
    fused, n = captured["fusion"], model.num_visual
    ours = torch.cat([fused[:, :1], fused[:, 1 + n:], fused[:, 1:1 + n]], dim=1)
    assert (ours - ref["intermediates"]["vl_out"].transpose(0, 1)).abs().max().item() <= 1e-4
