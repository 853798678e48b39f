"""qrnet.py: the QRNet student on tiny configs: shapes, QD-ATT, gradients, checkpoints (ours, QRNet's, Mask R-CNN's),
and parity with the official QRNet code.

Run: python -m pytest -q tests/test_qrnet.py
(The parity test needs the official code's outputs: its comment says which.)
"""
import argparse
import os

import pytest
import torch
from conftest import TINY_SWIN, ours_to_qrnet

import qrnet
import train
from losses import total_loss
from machinery.flags import UsageError
from machinery.interop import (
    load_model,
    load_visual_checkpoint,
    official_to_ours,
    ours_to_official,
    qrnet_config,
    qrnet_to_ours,
)
from model import GroundingModel, example_inputs


@pytest.fixture
def qrnet_config_tiny(tiny_config):
    def make(**overrides):
        return tiny_config(**{"backbone": "swin_toy_qrnet", "swin": dict(TINY_SWIN), **overrides})
    return make


@pytest.fixture
def model(qrnet_config_tiny):
    torch.manual_seed(0)
    return GroundingModel(qrnet_config_tiny()).eval()


def randomise_V(model, seed=1):
    """Non-zero V everywhere (a trained model's): at V = 0 every QD-ATT is the same constant gain, query or not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".V"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_output_shapes_keys_and_distill_locations(model):
    captured = {"stages": []}
    for norm in model.visual.stage_norms:  # (B,h,w,c)
        norm.register_forward_hook(lambda m, i, o: captured["stages"].append(o))
    model.visual.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("levels", o))
    model.fusion.register_forward_hook(lambda m, i, o: captured.__setitem__("fusion", o))
    out = model(**example_inputs(model.cfg))
    assert out["pred_boxes"].shape == (3, 4) and ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    stages, levels = captured["stages"], captured["levels"]
    assert [s.shape[1:] for s in stages] == [(16, 16, 16), (8, 8, 32), (4, 4, 64), (2, 2, 128)]
    assert [lvl.shape[-1] for lvl in levels] == [16, 8, 4, 2, 1] and levels[0].shape[1] == 32
    assert model.num_visual == 2 * 2 + 1 * 1  # stride 32 and stride 64
    fused = captured["fusion"]
    assert fused.shape[1] == 1 + 5 + model.cfg.max_query_len
    assert torch.equal(out["distill"]["loc1"][0], fused[:, 1]) and torch.equal(out["distill"]["loc1"][1], fused[:, 6])
    # the neck's first visual token, with its scale embedding, as it enters visual_proj; Swin's stage-4 first cell
    assert torch.equal(out["distill"]["loc3"][0], levels[3][:, :, 0, 0] + model.visual.scale_embed[0])
    assert torch.equal(out["distill"]["loc4"][0], stages[3][:, 0, 0])
    for loc, (v, t) in out["distill"].items():
        assert (v.shape[1], t.shape[1]) == model.distill_widths(loc), loc
    assert model.distill_widths("loc4") == (128, 64)


def test_a_three_stage_swin_runs_the_branch_one_level_shorter(qrnet_config_tiny, tmp_path):
    """The synthetic world's QRNet: 3 stages on a 64 px canvas (maps 16, 8, 4), so the fusion reads the stride-16
    level and the extra stride-32 one (4 x 4 + 2 x 2 tokens); its canvas must be a multiple of 16, not of 32."""
    swin = {**TINY_SWIN, "depths": [1, 2, 1], "num_heads": [1, 2, 2]}
    torch.manual_seed(0)
    model = GroundingModel(qrnet_config_tiny(swin=swin)).eval()
    captured = {}
    model.visual.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("levels", o))
    model.fusion.register_forward_pre_hook(lambda m, a: captured.__setitem__("is_pad", a[2]))
    x = example_inputs(model.cfg)  # sample 1: right half padded
    out = model(**x)
    assert [lvl.shape[-1] for lvl in captured["levels"]] == [16, 8, 4, 2] and model.num_visual == 4 * 4 + 2 * 2
    assert model.distill_widths("loc4") == (64, 64) and out["distill"]["loc4"][0].shape == (3, 64)
    assert captured["is_pad"][1, 1:21].view(-1).tolist() == [False, False, True, True] * 4 + [False, True] * 2
    randomise_V(model)
    torch.save(qrnet_checkpoint(model), tmp_path / "QRNet_3_stages.pth")  # official layout: layers.0-2, 4 levels
    loaded = load_model(str(tmp_path / "QRNet_3_stages.pth"))
    assert loaded.cfg.swin["depths"] == [1, 2, 1] and torch.equal(loaded(**x)["pred_boxes"], model(**x)["pred_boxes"])
    qrnet_config_tiny(swin=swin, imsize=48)  # 48 = 3 x 16: accepted
    with pytest.raises(UsageError, match="imsize"):
        qrnet_config_tiny(imsize=48)  # 4 stages need a multiple of 32
    with pytest.raises(UsageError, match="--swin"):
        qrnet_config_tiny(swin={**TINY_SWIN, "depths": [1, 1]})  # refused when the flags are read, not at build


def test_padded_cells_are_masked_per_level(model):
    captured = {}
    model.fusion.register_forward_pre_hook(lambda m, a: captured.__setitem__("is_pad", a[2]))
    x = example_inputs(model.cfg)  # sample 1: right half padded (columns 32..63)
    model(**x)
    vis_is_pad = captured["is_pad"][1, 1:6]  # 2x2 stride-32 cells, then the one stride-64 cell
    assert vis_is_pad.tolist() == [False, True, False, True, False]


def test_qdatt_is_a_constant_gain_of_a_quarter_at_initialisation(model):
    torch.manual_seed(0)
    x, query = torch.randn(2, 10, 32), torch.randn(2, 48)
    qda = qrnet.QueryDynamicAttention(32, 48)
    assert torch.equal(qda(x, query), x * 0.25)
    # in the model: all 4 backbone and 3 neck modules, whatever the image and the text
    seen = []
    for m in model.modules():
        if isinstance(m, qrnet.QueryDynamicAttention):
            m.register_forward_hook(lambda m, i, o: seen.append(torch.equal(o, i[0] * 0.25)))
    model(**example_inputs(model.cfg))
    assert seen == [True] * 7
    randomise_V(model)
    seen.clear()
    model(**example_inputs(model.cfg))
    assert seen == [False] * 7


def test_dynamic_linear_weights_come_from_the_query_as_documented():
    torch.manual_seed(0)
    layer = qrnet.DynamicLinear(3, 2, query_dim=5, rank=4)
    torch.nn.init.normal_(layer.V)
    x, query = torch.randn(2, 7, 3), torch.randn(2, 5)
    for b in range(2):  # U[i, j] = decoder(t)[i * rank + j]; [W; bias] = U V, the last row the bias
        U = layer.decoder(query[b]).view(4, 4)
        P = U @ layer.V
        assert torch.allclose(layer(x, query)[b], x[b] @ P[:3] + P[3], atol=1e-6)
        assert torch.allclose(layer(x[:, 0], query)[b], x[b, 0] @ P[:3] + P[3], atol=1e-6)  # pooled (B,in)


def test_every_trainable_parameter_gets_a_gradient_and_bert_through_the_query(qrnet_config_tiny):
    torch.manual_seed(0)
    model = GroundingModel(qrnet_config_tiny()).train()
    randomise_V(model)  # at V = 0 QD-ATT's decoders, and BERT through them, get exactly zero gradient
    out = model(**example_inputs(model.cfg))
    total_loss(out["pred_boxes"], torch.full((3, 4), 0.3))[0].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [] and all(p.requires_grad for p in model.parameters())
    # BERT's last-layer [CLS] is the query, not detached: Swin's output alone reaches BERT, only through QD-ATT
    model.zero_grad()
    model(**example_inputs(model.cfg))["distill"]["loc4"][0].square().sum().backward()
    assert model.text_encoder.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    assert model.visual.qdatt[0].spatial.decoder.weight.grad.abs().sum() > 0


def test_param_groups_put_qdatt_with_the_fusion_and_swin_with_the_visual_lr(model):
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]]
              for g in train.param_groups(model, None, train.TrainConfig())}
    assert sum(map(len, groups.values())) == len(names)
    assert all(".qdatt." not in n for n in groups["visual"])
    qdatt = [n for n in groups["fusion"] if ".qdatt." in n]
    assert len(qdatt) == 7 * 3 * 3  # 7 modules x 3 dynamic layers x (decoder weight, bias, V)
    assert {"visual.scale_embed", "pos_embed", "visual_proj.weight"} <= set(groups["fusion"])
    assert {"visual.neck.lateral.0.weight", "visual.stage_norms.3.weight", "visual.patch_embed.0.weight",
            "visual.stages.1.1.attn.relative_position_bias_table"} <= set(groups["visual"])
    assert all(n.startswith("text_encoder.") for n in groups["text"])


# -----------------------------------------------------------------------------
# checkpoints


def qrnet_checkpoint(model):
    """An official-format QRNet checkpoint made from one of our models: the unused tensors it keeps (RPN head, BERT
    pooler and position ids) added, args pickled, its optimizer and scheduler states as plain dicts."""
    sd = ours_to_qrnet(model.state_dict(), model.cfg.max_query_len)
    H = model.text_encoder.config.hidden_size
    sd |= {"visumodel.rpn_head.rpn_conv.weight": torch.zeros(32, 32, 3, 3), "visumodel.rpn_head.rpn_cls.bias":
           torch.zeros(3), "textmodel.bert.pooler.dense.weight": torch.zeros(H, H),
           "textmodel.bert.pooler.dense.bias": torch.zeros(H),
           "textmodel.bert.embeddings.position_ids": torch.arange(32)[None]}
    args = argparse.Namespace(imsize=64, max_query_len=model.cfg.max_query_len, vl_nheads=model.cfg.nheads,
                              bert_model="./checkpoints/bert-base-uncased", swin_checkpoint="none", lr_drop=60)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 179, "args": args,
            "lr_scheduler": {"step_size": 60, "gamma": 0.1, "last_epoch": 180, "_last_lr": [1e-6]}, "val_accu": 0.84}


def test_qrnet_checkpoint_loads_and_predicts_the_same(model, tmp_path):
    randomise_V(model)
    torch.save(qrnet_checkpoint(model), tmp_path / "QRNet_tiny.pth")
    loaded = load_model(str(tmp_path / "QRNet_tiny.pth"))
    assert not loaded.training and loaded.cfg.backbone == "swin_toy_qrnet" and loaded.cfg.max_query_len == 8
    assert {k: v for k, v in loaded.cfg.swin.items() if k != "drop_path"} == {
        k: v for k, v in TINY_SWIN.items() if k != "drop_path"}
    assert loaded.cfg.text_encoder == "bert-base-uncased"  # QRNet's default ./checkpoints/... is not here
    x = example_inputs(model.cfg)
    assert torch.equal(loaded(**x)["pred_boxes"], model(**x)["pred_boxes"])


def test_qrnet_key_mapping_round_trips_and_reorders_position_rows(model):
    ours = model.state_dict()
    L, N = model.cfg.max_query_len, model.num_visual
    official = ours_to_qrnet(ours, L)
    assert "visumodel.backbone.layers.1.blocks.1.mlp.fc2.weight" in official
    assert "visumodel.backbone.layers.0.qdatt.ChannelGate.mlp.2.decoder.V" in official
    assert "visumodel.neck.fpn_down.2.qdatt.SpatialGate.spatial.decoder.decoder.bias" in official
    assert official["visumodel.backbone.layers.0.blocks.0.attn.relative_position_index"].shape == (4, 4)
    assert official["scale_embed.weight"].shape == (5, 32)
    back = qrnet_to_ours(official, L)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    rows = torch.arange(1 + L + N, dtype=torch.float32)[:, None].expand(-1, 32)
    mapped = qrnet_to_ours({**official, "vl_pos_embed.weight": rows}, L)["pos_embed"][:, 0]
    assert mapped.tolist() == [0] + list(range(1 + L, 1 + L + N)) + list(range(1, 1 + L))


def test_swin_s_is_recognised_from_its_weights_alone():
    shapes = {"visumodel.backbone.patch_embed.proj.weight": torch.empty(96, 3, 4, 4),
              "visumodel.neck.lateral_convs.0.conv.weight": torch.empty(256, 96, 1, 1),
              "vl_pos_embed.weight": torch.empty(541, 256), "reg_token.weight": torch.empty(1, 256),
              "vl_transformer.encoder.layers.0.linear1.weight": torch.empty(2048, 256),
              "textmodel.bert.embeddings.word_embeddings.weight": torch.empty(30522, 768),
              "textmodel.bert.embeddings.position_embeddings.weight": torch.empty(512, 768),
              "textmodel.bert.embeddings.token_type_embeddings.weight": torch.empty(2, 768),
              "textmodel.bert.encoder.layer.0.intermediate.dense.weight": torch.empty(3072, 768)}
    for s, (depth, heads) in enumerate(zip([2, 2, 18, 2], [3, 6, 12, 24])):
        for b in range(depth):
            shapes[f"visumodel.backbone.layers.{s}.blocks.{b}.attn.relative_position_bias_table"] = torch.empty(169,
                                                                                                                heads)
    cfg = qrnet_config(shapes, {})
    assert (cfg.backbone, cfg.swin, cfg.max_query_len, cfg.imsize) == ("swin_s_qrnet", None, 40, 640)
    with pytest.raises(ValueError, match="max_query_len=20"):
        qrnet_config(shapes, {"max_query_len": 20})


def mask_rcnn_checkpoint(model):
    """A Mask R-CNN in mmdet's layout made from our model's Swin and lateral convs: no QD-ATT, plus the heads and FPN
    output convs QRNet drops."""
    visual = {k: v.clone() for k, v in model.visual.state_dict().items()
              if ".qdatt." not in "." + k and k != "scale_embed"}
    sd = ours_to_official(visual, "backbone.", "neck.")
    sd |= {"neck.fpn_convs.0.conv.weight": torch.zeros(32, 32, 3, 3), "rpn_head.rpn_cls.weight": torch.zeros(3, 32, 1, 1),
           "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 64), "roi_head.mask_head.conv_logits.bias": torch.zeros(80)}
    return {"meta": {"mmdet_version": "2.11.0", "CLASSES": ("person", "bicycle")}, "state_dict": sd}


def test_mask_rcnn_swin_or_qrnet_checkpoint_initialises_the_visual_branch(qrnet_config_tiny, tmp_path, capsys):
    torch.manual_seed(1)
    source = GroundingModel(qrnet_config_tiny())
    randomise_V(source)
    torch.save(mask_rcnn_checkpoint(source), tmp_path / "mask_rcnn.pth")
    torch.save(qrnet_checkpoint(source), tmp_path / "QRNet_tiny.pth")
    torch.manual_seed(2)
    fresh = GroundingModel(qrnet_config_tiny()).state_dict()
    # a detector: Swin and lateral convs; QD-ATT and the scale embeddings, which it has not, keep their init
    for init, with_qdatt in (("mask_rcnn.pth", False), ("QRNet_tiny.pth", True)):
        torch.manual_seed(2)
        model = GroundingModel(qrnet_config_tiny())
        load_visual_checkpoint(model, str(tmp_path / init))
        for k, v in model.state_dict().items():
            loaded = k.startswith("visual.") and k != "visual.scale_embed" and (with_qdatt or ".qdatt." not in k)
            assert torch.equal(v, source.state_dict()[k] if loaded else fresh[k]), (init, k)
        printed = capsys.readouterr().out
        if not with_qdatt:
            assert "ignored 4 (neck.fpn_convs, roi_head.bbox_head, roi_head.mask_head, rpn_head.rpn_cls)" in printed


def test_wrong_files_fail_with_messages_naming_them(qrnet_config_tiny, tiny_config, model, tmp_path):
    torch.save(mask_rcnn_checkpoint(model), tmp_path / "mask_rcnn.pth")
    wider = dict(TINY_SWIN, embed_dim=8)
    with pytest.raises(ValueError, match=r"mask_rcnn.pth does not fit backbone=swin_toy_qrnet.*wrong shape"):
        load_visual_checkpoint(GroundingModel(qrnet_config_tiny(swin=wider)), str(tmp_path / "mask_rcnn.pth"))
    with pytest.raises(ValueError, match=r"mask_rcnn.pth does not fit backbone=resnet18"):
        load_visual_checkpoint(GroundingModel(tiny_config()), str(tmp_path / "mask_rcnn.pth"))
    broken = qrnet_checkpoint(model)
    del broken["model"]["visumodel.neck.lateral_convs.2.conv.bias"]
    torch.save(broken, tmp_path / "QRNet_broken.pth")
    with pytest.raises(RuntimeError, match=r"(?s)QRNet_broken.pth.*visual.neck.lateral.2.bias"):
        load_model(str(tmp_path / "QRNet_broken.pth"))
    lying = qrnet_checkpoint(model)
    lying["args"].max_query_len = 20
    torch.save(lying, tmp_path / "QRNet_args.pth")
    with pytest.raises(ValueError, match=r"QRNet_args.pth.*max_query_len=20"):
        load_model(str(tmp_path / "QRNet_args.pth"))
    with pytest.raises(ValueError, match="--dilation: expected a bottleneck ResNet"):
        qrnet_config_tiny(dilation=True)
    with pytest.raises(ValueError, match="--visual_init: expected not imagenet"):
        qrnet_config_tiny(visual_init="imagenet")
    with pytest.raises(ValueError, match="--backbone: expected one of .*swin_s_qrnet, swin_toy_qrnet"):
        qrnet_config_tiny(backbone="swin_b_qrnet")


# -----------------------------------------------------------------------------
# parity with the official QRNet code

# The reference files come from running the official code (github.com/LukeForeverYoung/QRNet @ 6aaa23c, random weights,
# fp32, CPU, 640x640, torch.manual_seed(0) before build_model), in $QRNET_REF:
#   QRNet_random.pth, QRNet_random_q40.pth  its train.py checkpoints (20 and 40 tokens);
#   io.pt, io_q40.pt   one batch of 2 eval-transformed samples (img, img_mask 1 = pad, word_id, word_mask), pred_boxes
#                      and intermediates (neck_outs: the 5 levels (B,256,h,w); vl_out: the VL transformer's output,
#                      sequence-first, in QRNet's [REG, text, visual] order);
#   qda_V_random.pth, io_qdaV.pt  random non-zero QD-ATT V's and the outputs with them (V = 0 makes QD-ATT a constant
#                      gain of 1/4, which would hide a wrong DynamicLinear);
#   mask_rcnn_swin_s_random.pth, io_visual_init.pt  a Mask R-CNN Swin-S in mmdet's layout and QRNet_random.pth's
#                      outputs after the official code loads it (--swin_checkpoint).
# Without them the test is skipped, saying so: CI has no copy of the official code.
QRNET_REF = os.environ.get("QRNET_REF", "/tmp/qrnet_ref")
CASES = [("QRNet_random.pth", "io.pt", None), ("QRNet_random_q40.pth", "io_q40.pt", None),
         ("QRNet_random.pth", "io_qdaV.pt", "qda_V_random.pth"),
         ("QRNet_random.pth", "io_visual_init.pt", "mask_rcnn_swin_s_random.pth")]


def read_reference(name):
    # the files record torch.__version__ and the run's argparse.Namespace next to the tensors
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion, argparse.Namespace]):
        return torch.load(os.path.join(QRNET_REF, name), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt,io,extra", CASES)
def test_same_outputs_as_official_qrnet(ckpt, io, extra):
    if not os.path.isfile(os.path.join(QRNET_REF, io)):
        pytest.skip(f"no official QRNet reference outputs in {QRNET_REF}: they come from running the official code, "
                    f"which CI does not have (the comment above lists them)")
    model = load_model(os.path.join(QRNET_REF, ckpt))
    if extra == "qda_V_random.pth":  # official names, visumodel.*.decoder.V only
        V, left = official_to_ours(read_reference(extra), "visumodel.backbone.", "visumodel.neck.")
        assert not left and len(V) == 4 * 3 + 3 * 3
        assert model.visual.load_state_dict(V, strict=False).unexpected_keys == []
    elif extra is not None:
        load_visual_checkpoint(model, os.path.join(QRNET_REF, extra))
    ref = read_reference(io)
    inputs = read_reference("io_q40.pt" if io == "io_q40.pt" else "io.pt")
    ref = ref.get("intermediates", ref) | {"pred_boxes": ref["pred_boxes"]}
    captured = {}
    model.fusion.register_forward_hook(lambda m, i, o: captured.__setitem__("fusion", o))
    model.visual.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("neck", o))
    with torch.no_grad():
        out = model(inputs["img"], inputs["img_mask"].bool(), inputs["word_id"], inputs["word_mask"])
    assert (out["pred_boxes"] - ref["pred_boxes"]).abs().max().item() <= 1e-4
    # random weights leave the boxes near 0.5 whatever the input, so compare the neck's 5 levels and every fusion
    # output token as well, ours put back into QRNet's [REG, text, visual] order
    for ours, theirs in zip(captured["neck"], ref["neck_outs"], strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-4
    fused, n = captured["fusion"], model.num_visual
    ours = torch.cat([fused[:, :1], fused[:, 1 + n:], fused[:, 1:1 + n]], dim=1)
    assert (ours - ref["vl_out"].transpose(0, 1)).abs().max().item() <= 1e-4
