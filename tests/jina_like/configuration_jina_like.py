"""The config of a tiny model laid out as jina-clip-v1 is (loaded as remote code in the tests)."""

from transformers import PretrainedConfig


class JinaLikeConfig(PretrainedConfig):
    model_type = "jina_like_clip"

    def __init__(
        self,
        width=32,
        vision_depth=3,
        text_depth=2,
        heads=2,
        image_size=32,
        patch_size=8,
        vocab_size=50,
        max_positions=16,
        projection_dim=16,
        pad_token_id=0,
        **kwargs,
    ):
        self.width, self.heads = width, heads
        self.vision_depth, self.text_depth = vision_depth, text_depth
        self.image_size, self.patch_size = image_size, patch_size
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.projection_dim = projection_dim
        super().__init__(pad_token_id=pad_token_id, **kwargs)
