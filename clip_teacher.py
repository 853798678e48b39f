"""The CLIP teacher of EpmVG's cross-modal distillation: [DIE], [DTE] and the pooling to student widths.

CLIPTeacher wraps a transformers.CLIPModel and its tokenizer: encode_image gives [DIE] of the student's own augmented
canvas, encode_text [DTE] of the same (post-flip) expression, targets() pools both to the widths of the student
features that are distilled (eq. 5-6). The loss itself (eq. 7) is losses.distill_loss.

References
  EpmVG: Wang et al., arXiv 2312.17648, sec. 3.2, eq. 5-7; ablations in Tables 3-5.
  CLIP: Radford et al. 2021. HF CLIPModel.get_image_features / get_text_features = ln_post(CLS) @ proj
        and ln_final(x)[EOT] @ text_projection, the embeddings CLIP's contrastive loss compares.
  Prior art (CLIP-VG, HiVG, Dynamic-MDETR) feeds CLIP letterboxed, ImageNet-normalised images.

Choices the paper leaves open, and ours
  - Which CLIP: the paper says only "CLIP". Default ViT-B/16 (openai/clip-vit-base-patch16, 512-d), the
    default of CLIP-VG and HiVG; any CLIPModel name or directory works (ViT-L/14 gives 768-d).
  - Which features: the projected, pooled embeddings (the paper's "one-dimensional features"), not
    L2-normalised: the cosine loss ignores scale and the pooling is linear, so only the L1 variant
    (Table 3 #2) would see a difference, and the paper does not say it normalises.
  - Image input: the student's augmented canvas itself (same crop, flip, colour jitter), so teacher
    and student see one picture. The caller undoes the student's ImageNet normalisation (data.unnormalise,
    so that data.py stays the one place that defines it) and passes RGB in [0,1]; we resize it to CLIP's
    input size (bicubic with antialias, like CLIP's processor; no centre crop, which could cut out the
    referred object), clamp to [0,1] as CLIP's uint8 pipeline does, then apply CLIP's own mean/std
    (from the checkpoint's preprocessor_config.json, else OpenAI's), because that is what CLIP was
    trained on; CLIP-VG/HiVG keep ImageNet's constants instead, which OpenAI calls "robust" but not exact.
  - Padding: the canvas padding is 0 in ImageNet space, i.e. the ImageNet mean colour (124,116,104),
    the paper's "average value of the RGB channels". CLIP sees that grey letterbox as part of the
    picture (there is no attention mask in CLIP's vision tower); the resize blends its edge.
  - Text: OpenAI's basic clean (ftfy + HTML unescape; transformers' tokenizer does not run ftfy), CLIP
    BPE, truncated to the model's 77 positions keeping the end token, padded to the longest in the
    batch (CLIP's causal mask and end-token pooling make the padding length irrelevant).
  - Precision: fp32 weights, bf16 autocast on CUDA only, fp32 outputs. Text cache (opt-in, frozen only): exact
    string keys, LRU with a fixed number of entries.
  - Frozen (default; Table 5 #1): requires_grad_(False), eval mode, inference_mode. Not an nn.Module,
    so it can never be registered under the student: student.train(), state_dict(), DDP and optimizers
    built from student.parameters() cannot reach it. Checkpoints store .name and .weights_sha256.
  - Trainable (Table 5 #2, "unfrozen"): grads on, .parameters() go to the optimizer. It stays in eval
    mode even then: released CLIPs have no dropout (attention_dropout=0) and no batch norm, so train
    mode would change nothing there, and for a config with dropout eval keeps the targets noise-free.
This file imports nothing from the project (the synthetic world's toy CLIP: world/toy_clip.py).
"""

import hashlib
import html
from collections import OrderedDict
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import ftfy
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import cached_file

DEFAULT_TEACHER = "openai/clip-vit-base-patch16"

# -----------------------------------------------------------------------------
# eq. 5-6: adaptive average pooling of a teacher embedding to a student width


def adaptive_avg_pool(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B,E) -> (B,width) by 1-D adaptive average pooling over the channels (paper eq. 5-6).

    Bin i averages channels floor(i*E/width) .. ceil((i+1)*E/width)-1: 512 -> 256 averages adjacent
    pairs exactly, 768 -> 256 triples; a width above E (loc3/loc4: BERT's 768, a CNN's 2048) repeats
    or pair-averages channels instead.
    """
    if x.dim() != 2 or width < 1:
        raise ValueError(f"adaptive_avg_pool expects (B,E) and width >= 1, got {tuple(x.shape)} and {width}")
    return F.adaptive_avg_pool1d(x.unsqueeze(1), width).squeeze(1)  # (B,1,E) -> (B,1,width) -> (B,width)


# -----------------------------------------------------------------------------
# the teacher


def _load(name_or_path: str, init: str) -> tuple[CLIPModel, CLIPTokenizer]:
    """The CLIPModel (fp32 weights whatever the checkpoint stores: autocast gives bf16 speed, fp32 keeps LayerNorm and,
    when trainable, the optimizer's updates exact) and its tokenizer; init "random": the architecture at CLIP's own
    initialisation, the same draw for every run (seed 0), the caller's RNG left untouched."""
    try:
        if init == "pretrained":
            model = CLIPModel.from_pretrained(name_or_path, dtype=torch.float32)
        else:  # the control "a teacher that knows nothing"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = CLIPModel(CLIPConfig.from_pretrained(name_or_path)).float()
        return model, CLIPTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # missing, offline, corrupt: re-raised with the name, the cause chained
        raise OSError(
            f"CLIPTeacher: cannot load CLIP model + tokenizer from {name_or_path!r} ({type(e).__name__}: {e}).\n"
            "Offline, pass --teacher a local directory made where the hub is reachable, e.g.\n"
            "  python -c \"from transformers import CLIPModel, CLIPTokenizer, CLIPImageProcessor as P; "
            f"[c.from_pretrained('{DEFAULT_TEACHER}').save_pretrained('clip-b16') "
            "for c in (CLIPModel, CLIPTokenizer, P)]\"\n"
            "or fill the HF cache with `hf download <name>` and point HF_HOME at it.") from e


class CLIPTeacher:
    """A CLIP image/text encoder that gives distillation targets; a plain object, never a submodule.

    name_or_path: hub name or local directory holding a CLIPModel (config + weights) and its tokenizer.
    device: where the teacher runs (the student's device). trainable: Table 5 "unfrozen".
    dtype: autocast dtype on CUDA (None = bfloat16; torch.float32 = no autocast); CPU runs in fp32.
    text_cache_size: >0 keeps that many text embeddings (frozen only), keyed on the exact string.
    init: "pretrained" (the weights at name_or_path) or "random": the same architecture and tokenizer at CLIP's own
    initialisation (seed 0), the control that tells what the teacher knows from what any target of its shape does.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEACHER, *, device: torch.device | str,
                 trainable: bool = False, dtype: torch.dtype | None = None, text_cache_size: int = 0,
                 init: str = "pretrained") -> None:
        self.name, self.device, self.trainable, self.init = name_or_path, torch.device(device), trainable, init
        if init not in ("pretrained", "random"):
            raise ValueError(f"CLIPTeacher: init must be 'pretrained' or 'random', got {init!r}")
        if self.device.type == "cuda":
            self.amp_dtype = None if dtype == torch.float32 else (dtype or torch.bfloat16)
        elif dtype not in (None, torch.float32):
            raise ValueError(f"CLIPTeacher: dtype {dtype} needs CUDA (autocast is CUDA-only here), "
                             f"device is {device}")
        else:
            self.amp_dtype = None
        if trainable and text_cache_size:
            raise ValueError("CLIPTeacher: a text cache would go stale while the teacher trains; "
                             "use text_cache_size=0")
        self.model, self.tokenizer = _load(name_or_path, init)
        self.model = self.model.to(self.device)
        try:
            proc = CLIPImageProcessor.from_pretrained(name_or_path)
            clip_mean, clip_std = proc.image_mean, proc.image_std
        except OSError:  # no preprocessor_config.json: the constants every OpenAI CLIP was trained with
            clip_mean, clip_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        def channels(v):  # (3,) -> (1,3,1,1) fp32 on the device
            return torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

        self._clip_mean, self._clip_std = channels(clip_mean), channels(clip_std)
        cfg = self.model.config
        # A directory without tokenizer files still "loads" a 2-token tokenizer, and a wrong end-token id
        # makes CLIP pool the wrong position: both would give silent garbage [DTE], so refuse them here.
        # (Old configs say eos_token_id=2; transformers then pools at the largest id, CLIP's end token.)
        eos = len(self.tokenizer) - 1 if cfg.text_config.eos_token_id == 2 else cfg.text_config.eos_token_id
        if len(self.tokenizer) != cfg.text_config.vocab_size or self.tokenizer.eos_token_id != eos:
            raise ValueError(
                f"CLIPTeacher: the tokenizer in {name_or_path!r} ({len(self.tokenizer)} tokens, end token "
                f"{self.tokenizer.eos_token_id}) does not fit the CLIP text model "
                f"({cfg.text_config.vocab_size} tokens, end token {eos}); are the tokenizer files "
                "(vocab.json + merges.txt or tokenizer.json) there?")
        self.embed_dim = cfg.projection_dim  # E: 512 for ViT-B, 768 for ViT-L
        self.image_size = cfg.vision_config.image_size  # R: 224 for the OpenAI checkpoints
        self.context_length = cfg.text_config.max_position_embeddings  # 77
        self.model.eval()
        self.model.requires_grad_(trainable)
        self._cache_size, self._cache = text_cache_size, OrderedDict()  # str -> (E,) fp32

    def __repr__(self) -> str:
        return f"CLIPTeacher({self.name!r}, embed_dim={self.embed_dim}, trainable={self.trainable})"

    def parameters(self):
        """The CLIP parameters; train.py gives them to the optimizer only when trainable (at the visual lr)."""
        return self.model.parameters()

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 over the weight file(s) in name order: the teacher's identity, for checkpoints. An untrained
        teacher (init random) has no file of its weights: then over its tensors, in name order."""
        if self.init == "random":
            digest = hashlib.sha256()
            for _, t in sorted(self.model.state_dict().items()):
                digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            return digest.hexdigest()
        folder = Path(self.name)
        if not folder.is_dir():  # a hub name: the snapshot folder in the HF cache that from_pretrained used
            folder = Path(cached_file(self.name, "config.json")).parent
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"CLIPTeacher: no *.safetensors or *.bin weights in {folder}")
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    # -------------------------------------------------------------------------
    # encoders

    def _run(self, encode, **inputs: torch.Tensor) -> torch.Tensor:
        """Call a get_*_features method under the teacher's grad/precision policy -> (B,E) fp32."""
        grad = nullcontext() if self.trainable else torch.inference_mode()
        amp = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with grad, amp:
            emb = encode(**inputs).pooler_output  # (B,E), the projected embedding in transformers v5
        if self.trainable:
            return emb.float()
        # Copy outside inference mode: a tensor made inside it cannot be saved for backward, which a
        # student loss may need (e.g. a product with the target); the copy is an ordinary tensor.
        return emb.to(torch.float32, copy=True)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) RGB canvas in [0,1] -> (B,3,R,R) CLIP pixel_values (module docstring)."""
        if rgb.dim() != 4 or rgb.shape[1] != 3 or rgb.shape[2] != rgb.shape[3]:
            raise ValueError(f"CLIPTeacher expects a square canvas (B,3,S,S), got {tuple(rgb.shape)}")
        rgb = rgb.to(self.device, torch.float32)
        size = (self.image_size, self.image_size)
        rgb = F.interpolate(rgb, size=size, mode="bicubic", antialias=True, align_corners=False)  # (B,3,R,R)
        rgb = rgb.clamp(0.0, 1.0)  # bicubic overshoots at edges; CLIP's processor saturates via uint8
        return (rgb - self._clip_mean) / self._clip_std  # (B,3,R,R)

    def encode_image(self, rgb: torch.Tensor) -> torch.Tensor:
        """[DIE]: (B,3,S,S) RGB canvas in [0,1] -> (B,E) fp32 projected image embedding."""
        return self._run(self.model.get_image_features, pixel_values=self.preprocess(rgb))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """CLIP BPE ids (B,L<=77) and attention_mask (1 = real token) on the device."""
        # OpenAI's basic_clean: ftfy repairs mojibake, HTML entities are unescaped twice.
        cleaned = [html.unescape(html.unescape(ftfy.fix_text(t))).strip() for t in texts]
        tokens = self.tokenizer(cleaned, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device)}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[DTE]: B expressions -> (B,E) fp32 projected text embedding (from the cache when enabled)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CLIPTeacher expects a list of strings, got {type(texts).__name__}: "
                            f"{texts!r:.60}")
        if not self._cache_size:
            return self._run(self.model.get_text_features, **self.tokenize(texts))
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))  # unique, in order
        if missing:
            for t, emb in zip(missing, self._run(self.model.get_text_features, **self.tokenize(missing))):
                self._cache[t] = emb.clone()  # (E,); a view would keep the whole batch's storage alive
        rows = []
        for t in texts:
            self._cache.move_to_end(t)  # most recently used last
            rows.append(self._cache[t])
        while len(self._cache) > self._cache_size:  # evict least recently used; rows already gathered
            self._cache.popitem(last=False)
        return torch.stack(rows)  # (B,E), a new tensor: callers cannot alter the cache

    def targets(self, rgb: torch.Tensor, texts: list[str], widths: tuple[int | None, int | None]
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pooled ([DIE] (B,Cv), [DTE] (B,Ct)) for a location whose student widths are (Cv, Ct); rgb is the
        student's canvas (B,3,S,S) with its normalisation undone (data.unnormalise), in [0,1].

        A width of None skips that tower and gives None: image-only or text-only distillation (Table 3
        #3, #4) then pays for one encoder only (the image tower is most of the teacher's cost).
        """
        if len(texts) != rgb.shape[0]:
            raise ValueError(f"CLIPTeacher.targets: {rgb.shape[0]} images but {len(texts)} texts")
        img_width, txt_width = widths
        img = None if img_width is None else adaptive_avg_pool(self.encode_image(rgb), img_width)
        txt = None if txt_width is None else adaptive_avg_pool(self.encode_text(texts), txt_width)
        return img, txt
