"""Parity with the official TransVG code: same pred_boxes (and fusion outputs) on the same inputs.

Run: TRANSVG_REF=/tmp/transvg_ref python -m pytest -q tests/test_transvg_parity.py
The reference files come from running the official code (github.com/djiajunustc/TransVG @ c862427, random weights,
CPU, torch.manual_seed(0) before build_model): TransVG_random_{r50,r101,r50_q40}.pth (its train.py checkpoint format)
and io.pt / io_r101.pt / io_q40.pt holding one batch of 2 eval-transformed samples (img, img_mask 1 = pad, word_id,
word_mask), its pred_boxes, and the VL transformer's output (intermediates["vl_out"], sequence-first). Without them
the test is skipped, saying so: CI has no copy of the official code.

To make them (2 cores, a few minutes; nothing of the official code enters this project): the scripts in the shared
tools folder beside this checkout, ../shared/tools/transvg_reference/ (its README has the details), extract the
official snapshot to a scratch folder, install its two extra packages and import it at run time:
    bash ../shared/tools/transvg_reference/setup_transvg.sh <git dir of github.com/djiajunustc/TransVG>
    python ../shared/tools/transvg_reference/make_reference.py      # writes the files above into $TRANSVG_REF
"""
import os

import pytest
import torch

from interop import load_model

REF = os.environ.get("TRANSVG_REF", "/tmp/transvg_ref")
CASES = [("TransVG_random_r50.pth", "io.pt"), ("TransVG_random_r101.pth", "io_r101.pt"),
         ("TransVG_random_r50_q40.pth", "io_q40.pt")]


@pytest.mark.slow
@pytest.mark.parametrize("ckpt,io", CASES)
def test_same_outputs_as_official_transvg(ckpt, io):
    if not os.path.isfile(os.path.join(REF, io)):
        pytest.skip(f"no official TransVG reference outputs in {REF} (this file's docstring says how to make them; "
                    f"not in CI)")
    model = load_model(os.path.join(REF, ckpt))
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):  # the file records torch.__version__
        ref = torch.load(os.path.join(REF, io), weights_only=True)
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
