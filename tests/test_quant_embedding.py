"""int8 embedding tables (ptq_'s quantize_embeddings): real rounding, small error, save/load, selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffspeed.errors import DiffspeedError
from diffspeed.methods.ptq import PTQConfig, load_ptq_, ptq_model_, save_ptq
from diffspeed.methods.quantize import model_nbytes
from diffspeed.quant.embedding import QuantEmbedding, quantize_embedding
from method_tester import load_tiny


def test_rows_are_rounded_to_int8_with_bounded_error():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    qe = quantize_embedding(emb)
    assert qe.qweight.dtype == torch.int8 and int(qe.qweight.abs().max()) == 127
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    ref, out = emb(idx), qe(idx)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1)
    assert 0 < float(err.max()) <= 0.5 / 127 + 1e-6  # it rounds, by at most half a step of the row's scale


def test_unsupported_embedding_is_refused():
    with pytest.raises(DiffspeedError, match="max_norm"):
        quantize_embedding(nn.Embedding(10, 8, max_norm=1.0))


def _out(loaded, model):
    torch.manual_seed(0)
    kwargs = dict(loaded.make_condition([1, 2], torch.device("cpu")).cond)
    x = torch.randn(2, *loaded.latent_shape)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([600.0, 200.0]), **kwargs, return_dict=False)[0]


def test_ptq_quantize_embeddings_on_reference_model(tmp_path):
    ref_loaded = load_tiny("reference-image")
    ref = _out(ref_loaded, ref_loaded.transformer)
    loaded = load_tiny("reference-image")
    model = loaded.transformer
    before = model_nbytes(model)
    tables = [f for f, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert tables
    report = ptq_model_(model, PTQConfig(format="int8_weight_only", quantize_embeddings=True,
                                         exclude=(tables[0].replace(".", r"\."),)))
    assert report.embeddings == tables[1:] and report.skipped[tables[0]] == "excluded by pattern"
    assert all(isinstance(model.get_submodule(f), QuantEmbedding) for f in tables[1:])
    out = _out(loaded, model)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05
    assert model_nbytes(model) < before
    save_ptq(model, tmp_path / "q")
    fresh = load_tiny("reference-image")
    again = load_ptq_(fresh.transformer, tmp_path / "q")
    assert again.embeddings == tables[1:]
    assert torch.equal(_out(fresh, fresh.transformer), out)


def test_embeddings_stay_float_by_default():
    loaded = load_tiny("reference-image")
    report = ptq_model_(loaded.transformer, PTQConfig(format="int8_weight_only"))
    assert report.embeddings == []
    assert not any(isinstance(m, QuantEmbedding) for m in loaded.transformer.modules())


def test_quantize_embeddings_must_be_bool():
    with pytest.raises(DiffspeedError, match="quantize_embeddings"):
        PTQConfig(format="int8_weight_only", quantize_embeddings=1)


def test_load_refuses_a_table_of_another_size(tmp_path):
    loaded = load_tiny("reference-image")
    ptq_model_(loaded.transformer, PTQConfig(format="int8_weight_only", quantize_embeddings=True))
    save_ptq(loaded.transformer, tmp_path / "q")
    import json

    cfg = json.loads((tmp_path / "q" / "ptq_config.json").read_text())
    name = next(f for f, info in cfg["layers"].items() if info["format"] == "int8_embedding")
    cfg["layers"][name]["num_embeddings"] += 1
    (tmp_path / "q" / "ptq_config.json").write_text(json.dumps(cfg))
    from diffspeed.errors import WeightFileError

    with pytest.raises(WeightFileError, match="table"):
        load_ptq_(load_tiny("reference-image").transformer, tmp_path / "q")
