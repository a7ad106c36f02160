"""Tiny random causal LMs of each family (2 layers, hidden 64), saved by transformers itself with a small byte-level
BPE tokenizer, for import, export and runtime tests. Norm weights and biases are randomised: their default values
(ones, zeros; Gemma's zeros under 1 + w) would hide a wrong offset or a dropped bias."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = """Because of an hereditary recklessness, I have been playing always a losing game since my childhood.
During my grammar school days, I was laid up for about a week by jumping from the second story of the school
building. Some may ask why I committed such a rash act. There was no particular reason for doing such a thing
except that I was looking out from the second floor of the new school building, when one of my classmates, joking,
said to me that however I might brag, I would not be able to jump down from there.""" * 3

VOCAB = 320
FAMILIES = ("llama", "qwen2", "gemma3")


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return tok


def hf_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(**common, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    elif family == "qwen2":
        cfg = Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    else:
        cfg = Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1e6}})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny_lm(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random `family` model saved by transformers (config.json, model.safetensors, tokenizer.json)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(0, 0.1 if family == "gemma3" else 0.3).add_(0 if family == "gemma3" else 1.0)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer(), bos_token="<bos>", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(folder)
    return Path(folder)


def save_tiny_gguf(hf_folder: Path, path: Path, quant: str = "Q8_0") -> Path:
    """The tiny transformers model in `hf_folder` written as llama.cpp's converter writes it: Llama's q/k rows
    permuted into interleaved pairs, Gemma's norms stored as 1 + w, 2-D weights quantized (Q8_0), the tokenizer's
    vocabulary and merges in the metadata."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(hf_folder)
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[c.model_type]
    state = load_file(str(Path(hf_folder) / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    full = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(full["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if arch == "gemma3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
    else:
        w.add_rope_dimension_count(c.head_dim)
    tok = json.loads((Path(hf_folder) / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(c.vocab_size - len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    block.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"} if arch == "gemma3" else
                 {"post_attention_layernorm": "ffn_norm"})
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in state.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{block['.'.join(parts[3:-1])]}.{parts[-1]}"
        t = t.astype(np.float32)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            t = t + 1.0
        if t.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def text_windows(hf_folder: Path, length: int = 32, n: int = 8) -> list[list[int]]:
    """The first `n` windows of `length` tokens of TEXT, by the tokenizer saved in `hf_folder`."""
    from pocketformer.models.lm_importers import tokenizer_of

    ids = tokenizer_of(hf_folder).encode(TEXT).ids
    return [ids[i:i + length] for i in range(0, len(ids) - length, length)][:n]
