"""The synthetic world's settings: its own flags (WorldConfig) and the recipes of its two students.

machinery/recipes.py reaches it for --dataset shapes (the default) only: WorldConfig's flags join the run's, and SHAPES
(what `python train.py` runs) and SHAPES_QRNET (what --backbone swin_toy_qrnet changes in it) are its defaults. How
each was chosen, with every probe: docs/synthetic_world.md, docs/qrnet.md.
"""

from dataclasses import dataclass

from machinery.flags import check_fields
from world import scenes


@dataclass
class WorldConfig:
    shapes_train_size: int = 0  # generated training scenes (0 = world/scenes.py's default)
    shapes_eval_size: int = 0  # scenes per val/test split (0 = world/scenes.py's default)
    shapes_image_size: int = 128  # long side of the generated images, pixels
    shapes_rare_keep: float = scenes.RARE_KEEP  # how often the train split may say a rare word (1 = as val)
    toy_teacher_steps: int = 600  # training steps of the toy CLIP, built on first use (world/toy_clip.py)
    toy_detector_steps: int = 600  # training steps of the toy DETR (or, for QRNet, the toy Swin), built on first use

    def __post_init__(self) -> None:
        check_fields(self, [*[(k, getattr(self, k) >= 0, ">= 0") for k in (
                                "shapes_train_size", "shapes_eval_size", "toy_teacher_steps", "toy_detector_steps")],
                            ("shapes_image_size", self.shapes_image_size >= 32, ">= 32 pixels"),
                            ("shapes_rare_keep", 0 <= self.shapes_rare_keep <= 1, "in [0, 1]")])

    def size(self, split: str) -> int:
        """Scenes in `split`: --shapes_train_size for train, --shapes_eval_size for any other, the split's default size
        (scenes.SPLITS) where the flag is 0."""
        return (self.shapes_train_size if split == "train" else self.shapes_eval_size) or scenes.SPLITS[split][1]


# The paper's setting in miniature. The student starts from a pretrained visual branch, the toy DETR, kept frozen so
# that its tokens are computed once per scene (cache_visual), and learns BERT and the fusion on a small grounding split
# (10,000 scenes, in which scenes.RARE_WORDS are rare), while the toy CLIP has learned from captions of other scenes
# that say every word at its natural frequency. A ResNet-18 to layer3 (stride 16) at a 64 px canvas gives 4 x 4
# tokens; 1 encoder + 4 fusion layers of width 64; a 1-layer BERT over the world's 24 words without dropout; the
# fusion's positions start small (pos_std 0.02); 32 epochs in batches of 64 (4,992 steps), AdamW at 5e-4 with a cosine
# decay, chosen on --distill none and applied to every arm alike. It scores val at each quarter of the run (an
# evaluation runs the visual branch on 1,000 scenes, ~5 s on 2 cores; it leaves the training bit for bit the same).
# Data loading stays in the main process: on 2 cores a worker process only competes with the model for them.
SHAPES = dict(
    backbone="resnet18", resnet_stages=3, trainable_bn=True, imsize=64, hidden_dim=64, nheads=4,
    dim_feedforward=128, dropout=0.0, enc_layers=1, vl_layers=4, pos_std=0.02, max_query_len=16,
    text_encoder="world/toy_models/vocab", text_init="random",
    text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                 "max_position_embeddings": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    visual_init="world/toy_models/detr.pth", teacher="world/toy_models/clip", cache_visual=True, augment=False,
    epochs=32, lr_schedule="cosine", warmup_steps=50, clip_grad=1.0, batch_size=64, micro_batch=64,
    lr=5e-4, lr_text=5e-4, shapes_train_size=10000, num_workers=0, eval_batch=250, eval_every=1248)

# A QRNet student on the same world, with the same toy CLIP, BERT and fusion. Its visual branch reads the expression,
# so it can be neither the toy DETR nor cached; as QRNet starts from a Mask R-CNN Swin, it starts from a toy one
# (world/toy_detectors.py: the Swin and the neck's lateral convs pretrained to detect the world's objects without text;
# QD-ATT at its initialisation), which trains at a tenth of the lr of what is new (QD-ATT, scale embeddings, fusion,
# head) and of the random toy BERT: QRNet's split, scaled. Its Swin has 3 stages (qrnet.SWIN_SIZES), as the TransVG
# toy's ResNet stops at layer3: on the same 64 px canvas the fusion reads strides 16 and 32, 4 x 4 + 2 x 2 tokens;
# pos_std 1 is TransVG's nn.Embedding init. Batch 32 for 12 epochs (3,744 steps, cosine), chosen on --distill none.
SHAPES_QRNET = dict(
    resnet_stages=4, visual_init="world/toy_models/swin.pth", toy_detector_steps=600, cache_visual=False, augment=False,
    imsize=64, pos_std=1.0, epochs=12, lr_schedule="cosine", warmup_steps=50, clip_grad=1.0, batch_size=32,
    micro_batch=32, lr=5e-4, lr_visual=5e-5, lr_text=5e-4, eval_every=500)
