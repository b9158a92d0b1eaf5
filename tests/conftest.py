import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models: thread sync costs more than it saves


@pytest.fixture
def tiny_dit():
    from diffspeed.models.loading import load_model

    return load_model("tiny-dit")
