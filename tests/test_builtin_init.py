"""The built-in random models start as `transformers.CLIPModel` initialises itself
(`CLIPPreTrainedModel._init_weights`): every tensor's standard deviation (and mean) is compared
with a freshly initialised CLIPModel of the same config; the one documented departure (the text
position embedding, `builtin.TEXT_POSITION_STD`) is checked against its own value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from mlx_clip.model.builtin import TEXT_POSITION_STD, builtin_configs, random_weights
from mlx_clip.torch_backend.model import hf_config


@pytest.mark.parametrize("name", ["small", "vit-b32"])
def test_every_tensor_has_transformers_init_std(name):
    config = builtin_configs()[name]
    ours = random_weights(config, seed=0)
    torch.manual_seed(0)
    reference = {k: v.detach().numpy() for k, v in transformers.CLIPModel(hf_config(config)).state_dict().items()
                 if not k.endswith("position_ids")}
    assert set(ours) == set(reference)
    for key, ref in reference.items():
        mine = ours[key]
        assert mine.shape == ref.shape, key
        if ref.size == 1 or ref.std() == 0:  # constants: norms 1/0, biases 0, logit scale
            np.testing.assert_array_equal(mine, ref, err_msg=key)
            continue
        # Sampling error of a std estimate over n values is ~ std / sqrt(2n); 5 of those, and at
        # least 3% (a 64-value tensor), separate a wrong init (a factor 2 or more) from chance.
        slack = max(0.03, 5 / np.sqrt(2 * ref.size))
        expected = ref.std()
        if key == "text_model.embeddings.position_embedding.weight":
            # The one documented departure (builtin.TEXT_POSITION_STD): transformers' 0.02 halved.
            assert expected == pytest.approx(0.02, rel=slack)
            expected = TEXT_POSITION_STD
        assert abs(mine.std() / expected - 1) < slack, (key, mine.std(), expected)
        assert abs(mine.mean()) < 5 * ref.std() / np.sqrt(ref.size) + 1e-6, key
