"""Importing Hugging Face folders made by save_pretrained: parity with transformers, and clear refusals."""

import hashlib
import json
import os
import shlex

import pytest
import torch

from pocketformer.errors import ArchitectureError, CheckpointError, ParityError
from pocketformer.models import import_hf
from pocketformer.models.importers import PARITY_TOL, read_hf_weights

KINDS = ["bert", "bert-cls", "roberta", "roberta-cls", "distilbert", "distilbert-cls", "vit", "vit-cls"]


@pytest.mark.parametrize("kind", KINDS)
def test_import_passes_the_parity_check(make_hf_checkpoint, kind):
    _, provenance = import_hf(make_hf_checkpoint(kind))
    assert provenance["import_parity_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_imported_model_matches_transformers_on_fresh_inputs(tmp_path, make_hf_model, make_text_inputs,
                                                             make_vision_inputs, kind):
    source = make_hf_model(kind)
    source.save_pretrained(str(tmp_path / kind))
    model, _ = import_hf(tmp_path / kind, check_parity=False)
    with torch.no_grad():
        if kind.startswith("vit"):
            (pixels,) = make_vision_inputs(batch=3, seed=7)
            out = source(pixel_values=pixels)
            ours = model(pixels) if kind.endswith("-cls") else model.encode(pixels)
            theirs = out.logits if kind.endswith("-cls") else out.last_hidden_state
        else:
            ids, mask = make_text_inputs(batch=3, seq=21, seed=7)
            ids[mask == 0] = source.config.pad_token_id
            out = source(input_ids=ids, attention_mask=mask)
            if kind.endswith("-cls"):
                ours, theirs = model(ids, mask), out.logits
            else:  # padded positions are masked out of everything downstream
                keep = mask.bool()
                ours, theirs = model.encode(ids, mask)[keep], out.last_hidden_state[keep]
    assert theirs.abs().max() > 1e-2  # a real signal, not near-zero outputs that match trivially
    assert (ours - theirs).abs().max() <= PARITY_TOL


@pytest.mark.parametrize("kind,n_labels", [("bert-cls", 3), ("distilbert-cls", 2), ("vit-cls", 10)])
def test_classifier_import_keeps_one_output_per_source_label(make_hf_checkpoint, kind, n_labels):
    model, _ = import_hf(make_hf_checkpoint(kind, num_labels=n_labels))
    assert model.config.task == "classification"
    assert len(model.config.head.labels) == n_labels


def test_base_model_imports_as_an_embedding_model(make_hf_checkpoint):
    model, _ = import_hf(make_hf_checkpoint("roberta"))
    assert model.config.task == "embedding" and model.classifier is None


def test_provenance_records_the_source_files_sha256(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    _, provenance = import_hf(folder)
    expected = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert provenance["source_files_sha256"] == {"model.safetensors": expected}
    assert provenance["source_model_type"] == "bert"


def test_sharded_safetensors_checkpoint_imports_with_parity(tmp_path, make_hf_model):
    make_hf_model("bert-cls").save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, provenance = import_hf(tmp_path / "sharded")
    assert len(provenance["source_files_sha256"]) > 1
    assert provenance["import_parity_max_abs_diff"] <= 1e-4


# -- refusals -------------------------------------------------------------------------------------------------------

def test_gpt2_checkpoint_is_refused_as_unsupported_architecture(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    transformers.GPT2Model(cfg).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ArchitectureError, match="gpt2"):
        import_hf(tmp_path / "gpt2")


def test_t5_config_is_refused_as_unsupported_architecture(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(ArchitectureError, match="t5"):
        import_hf(tmp_path / "t5")


def test_unsupported_activation_is_refused(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "silu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureError, match="silu"):
        import_hf(folder)


def test_a_variant_the_canonical_model_does_not_reproduce_fails_parity(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")  # same weights, but transformers will now apply a causal mask
    cfg = json.loads((folder / "config.json").read_text())
    cfg["is_decoder"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityError):
        import_hf(folder)


def test_missing_checkpoint_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        import_hf(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder_is_a_checkpoint_error(make_hf_checkpoint):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        import_hf(make_hf_checkpoint("bert") / "model.safetensors")


def test_folder_without_config_json_is_a_checkpoint_error(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        import_hf(folder)


def test_invalid_config_json_is_a_checkpoint_error(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    (folder / "config.json").write_text('{"model_type": "bert",')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        import_hf(folder)


def test_folder_without_weights_is_a_checkpoint_error(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(folder)


def test_truncated_safetensors_is_a_checkpoint_error(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_hf(folder)


def test_weights_that_disagree_with_config_json_are_a_checkpoint_error(make_hf_checkpoint):
    folder = make_hf_checkpoint("bert")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        import_hf(folder)


# -- pickles ----------------------------------------------------------------------------------------------------------

class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _pickle_checkpoint(folder, make_hf_model, state):
    source = make_hf_model("bert")
    source.config.save_pretrained(str(folder))
    torch.save(state if state is not None else source.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_with_code_is_refused_without_running_it(tmp_path, make_hf_model):
    marker = tmp_path / "pwned"
    folder = _pickle_checkpoint(tmp_path / "evil", make_hf_model, {"embeddings.word_embeddings.weight":
                                                                   RunsCode(marker)})
    with pytest.raises(CheckpointError, match="not a plain tensor pickle"):
        import_hf(folder, trust_pickle=True)  # even when trusted, only tensors come out
    assert not marker.exists()


def test_a_pickle_is_refused_unless_trusted(tmp_path, make_hf_model):
    folder = _pickle_checkpoint(tmp_path / "plain", make_hf_model, None)
    with pytest.raises(CheckpointError, match="trust"):
        import_hf(folder)


def test_the_malicious_pickle_really_runs_code_when_loaded_unsafely(tmp_path, make_hf_model):
    """Control for the test above: the payload is live, so its refusal is what kept the marker away."""
    marker = tmp_path / "pwned"
    folder = _pickle_checkpoint(tmp_path / "evil", make_hf_model, {"x": RunsCode(marker)})
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_pickle_with_non_tensor_values_is_refused(tmp_path, make_hf_model):
    folder = _pickle_checkpoint(tmp_path / "odd", make_hf_model, {"w": torch.zeros(2), "note": "not a tensor"})
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        read_hf_weights(folder, trust_pickle=True)


def test_tensor_only_pickle_loads_through_weights_only(tmp_path, make_hf_model):
    folder = _pickle_checkpoint(tmp_path / "plain", make_hf_model, None)
    _, provenance = import_hf(folder, trust_pickle=True)
    assert list(provenance["source_files_sha256"]) == ["pytorch_model.bin"]
    assert provenance["import_parity_max_abs_diff"] <= 1e-4


# -- the real MiniLM checkpoint -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_from_its_package_imports_with_parity(minilm_path):
    model, provenance = import_hf(minilm_path)
    assert provenance["import_parity_max_abs_diff"] <= 1e-4
    assert provenance["source_model_type"] == "bert"
    assert [(s.heads, s.head_dim, s.ffn) for s in model.config.layers] == [(12, 32, 1536)] * 6
