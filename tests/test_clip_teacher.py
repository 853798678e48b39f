"""The CLIP teacher on a tiny random CLIP built here (no network, no downloaded weights).

Run: python -m pytest -q tests/test_clip_teacher.py
"""
import hashlib
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_clip
from transformers import CLIPImageProcessor, CLIPTokenizer
from transformers.image_utils import IMAGENET_DEFAULT_MEAN
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN
from transformers.image_utils import OPENAI_CLIP_STD as CLIP_STD

import data
import train
from clip_teacher import CLIPTeacher, adaptive_avg_pool
from losses import distill_loss
from model import GroundingModel, example_inputs

IMAGE_SIZE = 32  # R of the tiny CLIP; the canvases below are S = 48 so the teacher really resizes
CANVAS = 48
TEXTS = ["the man", "a red b", "man on the left !"]


def channels(v):
    return torch.tensor(v).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A saved tiny random CLIP with 512-d embeddings like ViT-B's, without a preprocessor config."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(directory, projection_dim=512)
    return directory


@pytest.fixture(scope="module")
def teacher(clip_dir):
    return CLIPTeacher(str(clip_dir), device="cpu")


def random_canvas(batch=2, seed=0):
    """RGB in [0,1], what the teacher takes (train.py passes data.unnormalise of the student's canvas)."""
    return torch.rand(batch, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(seed))


def student_batch(cfg, batch=3):
    """Forward's arguments for a tiny GroundingModel, in order."""
    return list(example_inputs(cfg, batch).values())


# -----------------------------------------------------------------------------
# pooling (eq. 5-6)


def test_pool_512_to_256_averages_adjacent_pairs_exactly():
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adaptive_avg_pool(x, 256), (x[:, 0::2] + x[:, 1::2]) / 2, rtol=0, atol=0)


def test_pool_768_to_256_averages_triples():
    x = torch.randn(4, 768, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adaptive_avg_pool(x, 256), (x[:, 0::3] + x[:, 1::3] + x[:, 2::3]) / 3)


def test_pool_to_a_larger_width():
    # 512 -> 768: bin 3k covers channel 2k, bin 3k+1 channels 2k..2k+1, bin 3k+2 channel 2k+1
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    out = adaptive_avg_pool(x, 768).view(2, 256, 3)
    even, odd = x[:, 0::2], x[:, 1::2]
    torch.testing.assert_close(out, torch.stack([even, (even + odd) / 2, odd], dim=-1))
    with pytest.raises(ValueError, match="expects"):
        adaptive_avg_pool(x[0], 256)


# -----------------------------------------------------------------------------
# preprocessing: the student's canvas, unnormalised -> CLIP pixel values


def test_constant_colour_and_padding_map_to_clip_normalised_values(teacher):
    colour = torch.tensor([0.2, 0.5, 0.9])
    pixels = teacher.preprocess(colour.view(1, 3, 1, 1).expand(1, 3, CANVAS, CANVAS))
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = (colour - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # no processor config
    torch.testing.assert_close(pixels, expected.view(1, 3, 1, 1).expand_as(pixels), atol=1e-5, rtol=0)
    # Padding is 0 in ImageNet space = the ImageNet mean colour, which CLIP sees as a grey letterbox.
    padding = teacher.preprocess(data.unnormalise(torch.zeros(1, 3, CANVAS, CANVAS)))
    grey = (torch.tensor(IMAGENET_DEFAULT_MEAN) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(padding, grey.view(1, 3, 1, 1).expand_as(padding), atol=1e-5, rtol=0)


def test_bicubic_overshoot_is_clamped_to_the_valid_range(teacher):
    rgb = torch.zeros(1, 3, CANVAS, CANVAS)
    rgb[..., CANVAS // 2:] = 1.0  # a black/white edge makes bicubic ring below 0 and above 1
    pixels = teacher.preprocess(rgb)
    low = (0 - channels(CLIP_MEAN)) / channels(CLIP_STD)
    high = (1 - channels(CLIP_MEAN)) / channels(CLIP_STD)
    assert (pixels >= low - 1e-6).all() and (pixels <= high + 1e-6).all()


def test_preprocess_matches_clips_own_processor_on_a_square_image(teacher):
    # CLIP's processor on a square image: resize to R (bicubic), the centre crop is then a no-op.
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=CANVAS, mode="bilinear")
    image_u8 = (smooth[0] * 255).round().to(torch.uint8)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    reference = processor(images=image_u8, return_tensors="pt")["pixel_values"]
    ours = teacher.preprocess(image_u8[None].float() / 255)
    # The processor resizes in uint8 (rounded, fixed-point taps); we resize in float. Allow one uint8 level.
    one_level = 1 / 255 / min(CLIP_STD)
    torch.testing.assert_close(ours, reference, atol=one_level, rtol=0)
    assert (ours - reference).abs().mean() < one_level / 2


def test_clip_mean_std_come_from_the_preprocessor_config(clip_dir, tmp_path):
    directory = shutil.copytree(clip_dir, tmp_path / "clip_with_processor")
    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(directory)
    colour = torch.tensor([0.2, 0.5, 0.9])
    pixels = CLIPTeacher(str(directory), device="cpu").preprocess(colour.view(1, 3, 1, 1).expand(1, 3, CANVAS, CANVAS))
    torch.testing.assert_close(pixels[0, :, 0, 0], (colour - 0.5) / 0.25, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# embeddings equal CLIPModel's, then pooled


def test_image_embedding_equals_get_image_features_then_pooled(teacher):
    canvas = random_canvas()
    with torch.no_grad():
        reference = teacher.model.get_image_features(pixel_values=teacher.preprocess(canvas)).pooler_output
    emb = teacher.encode_image(canvas)
    assert emb.shape == (2, 512) and emb.dtype == torch.float32 and teacher.embed_dim == 512
    torch.testing.assert_close(emb, reference)
    torch.testing.assert_close(teacher.encode_image(canvas), emb, rtol=0, atol=0)  # deterministic
    img, txt = teacher.targets(canvas, TEXTS[:2], widths=(256, 768))
    torch.testing.assert_close(img, (reference[:, 0::2] + reference[:, 1::2]) / 2)
    assert txt.shape == (2, 768)


def test_text_embedding_equals_get_text_features_then_pooled(teacher, clip_dir):
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = teacher.model.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(teacher.encode_text(TEXTS), reference)
    img, txt = teacher.targets(random_canvas(3), TEXTS, widths=(None, 256))  # text-only: no image tower
    assert img is None
    torch.testing.assert_close(txt, (reference[:, 0::2] + reference[:, 1::2]) / 2)
    # OpenAI's basic clean: HTML entities are unescaped before BPE
    assert torch.equal(teacher.tokenize(["a &amp; b"])["input_ids"], teacher.tokenize(["a & b"])["input_ids"])


def test_long_text_is_truncated_to_77_and_keeps_its_end_token(teacher):
    ids = teacher.tokenize(["the man " * 60])["input_ids"]
    assert ids.shape == (1, 77)
    assert ids[0, 0] == teacher.tokenizer.bos_token_id and ids[0, -1] == teacher.tokenizer.eos_token_id
    with torch.no_grad():
        reference = teacher.model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(teacher.encode_text(["the man " * 60]), reference)


# -----------------------------------------------------------------------------
# frozen teacher: invisible to the student, no gradients, always eval


def test_frozen_teacher_stays_out_of_the_student(teacher, tiny_config):
    torch.manual_seed(0)
    student = GroundingModel(tiny_config())
    keys = set(student.state_dict())
    student.teacher = teacher  # even as an attribute it is not registered: it is not an nn.Module
    student.train()
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(student.state_dict()) == keys
    teacher_ids = {id(p) for p in teacher.parameters()}
    groups = train.param_groups(student, teacher, train.TrainConfig())  # the optimizer's groups in train.py
    assert not teacher_ids & {id(p) for group in groups for p in group["params"]}
    groups = train.param_groups(student, teacher, train.TrainConfig(teacher_trainable=True))
    assert {id(p) for p in groups[-1]["params"]} == teacher_ids and groups[-1]["base_lr"] == 1e-5


def test_each_location_gets_targets_of_its_width_and_only_the_student_gets_gradients(teacher, tiny_config):
    torch.manual_seed(0)
    student = GroundingModel(tiny_config()).train()
    batch = student_batch(student.cfg)
    out = student(*batch)
    loss = 0.0
    for loc in ("loc1", "loc2", "loc3", "loc4"):  # tiny widths: (32,32) (32,32) (32,64) (512,64)
        target = teacher.targets(data.unnormalise(batch[0]), TEXTS, student.distill_widths(loc))
        assert [t.shape for t in target] == [f.shape for f in out["distill"][loc]]
        assert not any(t.requires_grad or t.is_inference() for t in target)
        loss = loss + sum(distill_loss(out["distill"][loc], target).values())
    # A product saves the teacher tensor for backward, which an inference-mode tensor would refuse;
    # the unpooled embedding is what a loss would see without targets().
    dte = teacher.encode_text(TEXTS)  # (3,512)
    cls = out["distill"]["loc1"][1]  # (3,32)
    (loss + (cls * dte[:, :32]).mean()).backward()
    assert student.fusion.layers[-1].linear2.weight.grad.abs().sum() > 0  # reached through loc1
    assert student.visual.backbone.layer4[-1].conv2.weight.grad.abs().sum() > 0  # reached through loc4 too
    assert all(p.grad is None for p in teacher.parameters())


# -----------------------------------------------------------------------------
# trainable teacher (Table 5 "unfrozen")


def test_trainable_teacher_gets_the_distillation_gradient_and_updates(clip_dir, tiny_config):
    teacher = CLIPTeacher(str(clip_dir), device="cpu", trainable=True)
    torch.manual_seed(0)
    student = GroundingModel(tiny_config()).train()
    assert not teacher.model.training and all(p.requires_grad for p in teacher.parameters())
    # train.py's groups: the teacher joins the optimizer at the backbone learning rate
    optimizer = torch.optim.AdamW(train.param_groups(student, teacher, train.TrainConfig(teacher_trainable=True)))
    batch = student_batch(student.cfg)
    target = teacher.targets(data.unnormalise(batch[0]), TEXTS, student.distill_widths("loc1"))
    sum(distill_loss(student(*batch)["distill"]["loc1"], target).values()).backward()
    model = teacher.model
    for p in (model.visual_projection.weight, model.text_projection.weight,
              model.vision_model.embeddings.patch_embedding.weight,
              model.text_model.embeddings.token_embedding.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    before = model.visual_projection.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.visual_projection.weight)


# -----------------------------------------------------------------------------
# text cache, identity, errors


def test_text_cache_is_exact_and_bounded(clip_dir, teacher):
    cached = CLIPTeacher(str(clip_dir), device="cpu", text_cache_size=3)
    texts = ["the man", "a red b", "man on the left !", "the man"]
    first = cached.encode_text(texts)
    torch.testing.assert_close(first, teacher.encode_text(texts), rtol=0, atol=1e-6)
    assert list(cached._cache) == ["a red b", "man on the left !", "the man"]  # least recently used first
    torch.testing.assert_close(cached.encode_text(["the man"]), first[:1], rtol=0, atol=0)  # a hit
    cached.encode_text(["x y", "z"])
    assert list(cached._cache) == ["the man", "x y", "z"]  # bound kept by evicting the oldest two
    # each entry owns just its (512,) fp32 row, so the bound is on memory too, not only on entries
    assert all(e.untyped_storage().nbytes() == 512 * 4 for e in cached._cache.values())
    with pytest.raises(ValueError, match="stale"):
        CLIPTeacher(str(clip_dir), device="cpu", trainable=True, text_cache_size=3)


def test_identity_name_and_weights_hash(clip_dir, teacher):
    assert teacher.name == str(clip_dir)
    assert teacher.weights_sha256 == hashlib.sha256((clip_dir / "model.safetensors").read_bytes()).hexdigest()


def test_missing_or_corrupt_weights_give_a_clear_error(clip_dir, tmp_path):
    missing = str(tmp_path / "no_such_clip")
    with pytest.raises(OSError, match="no_such_clip") as info:
        CLIPTeacher(missing, device="cpu")
    assert "local directory" in str(info.value) and "save_pretrained" in str(info.value)
    with pytest.raises(OSError, match="nobody/no-such-clip"):  # a hub name, offline (conftest)
        CLIPTeacher("nobody/no-such-clip", device="cpu")
    corrupt = shutil.copytree(clip_dir, tmp_path / "corrupt_clip")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="corrupt_clip"):
        CLIPTeacher(str(corrupt), device="cpu")


def test_a_directory_without_tokenizer_files_is_refused(clip_dir, tmp_path):
    # transformers would silently build a 2-token tokenizer there, turning every expression into unknowns
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, tmp_path / name)
    with pytest.raises(ValueError, match="tokenizer files"):
        CLIPTeacher(str(tmp_path), device="cpu")


def test_bad_inputs_are_rejected(teacher):
    with pytest.raises(ValueError, match="square canvas"):
        teacher.encode_image(torch.zeros(1, 3, 32, 48))
    with pytest.raises(TypeError, match="list of strings"):
        teacher.encode_text("the man")
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        teacher.targets(random_canvas(2), TEXTS, widths=(256, 256))
    with pytest.raises(ValueError, match="CUDA"):
        CLIPTeacher(teacher.name, device="cpu", dtype=torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 autocast path runs only on CUDA")
def test_cuda_runs_bf16_and_returns_fp32(clip_dir, teacher):
    gpu = CLIPTeacher(str(clip_dir), device="cuda")
    canvas = random_canvas()
    emb = gpu.encode_image(canvas.cuda())
    assert emb.dtype == torch.float32 and gpu.amp_dtype == torch.bfloat16
    cos = F.cosine_similarity(emb.cpu(), teacher.encode_image(canvas))
    assert (cos > 0.99).all()


def test_an_untrained_teacher_has_the_same_architecture_and_no_knowledge(tmp_path):
    """--teacher_init random: the control "a teacher that knows nothing". Same config and tokenizer, CLIP's own
    initialisation with a fixed seed (the same draw for every run), and the caller's RNG is left where it was."""
    save_tiny_clip(tmp_path, seed=1)  # seed 1 stands for the trained weights: any draw but the control's own
    clip_dir, teacher = str(tmp_path), CLIPTeacher(str(tmp_path), device="cpu")
    before = torch.get_rng_state()
    a, b = (CLIPTeacher(clip_dir, device="cpu", init="random") for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)
    trained = dict(teacher.model.named_parameters())
    for name, p in a.model.named_parameters():
        assert p.shape == trained[name].shape and torch.equal(p, dict(b.model.named_parameters())[name])
    assert a.weights_sha256 == b.weights_sha256 != teacher.weights_sha256
    assert not torch.allclose(a.encode_text(["the red circle"]), teacher.encode_text(["the red circle"]))
    with pytest.raises(ValueError, match="init"):
        CLIPTeacher(clip_dir, device="cpu", init="imagenet")
