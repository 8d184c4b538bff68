#!/usr/bin/env python3
"""Tiny random-init Hugging Face transformers, one per family, as committed fixtures.

For every family (llama and mistral with grouped-query attention, qwen2 with GQA, QKV
biases and tied embeddings, gpt2, bert, roberta, distilbert, vit) this builds the model
class of `transformers` (hidden 32, 2 layers, 4 heads) from a seeded config, replaces
every parameter by seeded random values (norm weights and biases included, so that a
forgotten norm or bias changes the outputs), and writes into tests/golden/transformers/NAME/:

  model.safetensors  the weights (save_pretrained)
  config.json        the config (save_pretrained)
  io.safetensors     the fixed input (`input_ids` int64 or `pixel_values` f32) and the
                     model's `logits` on it (f32, eager attention, eval mode)

Run from the crate root:  venv-mk/bin/python tests/golden/transformers/gen.py
"""
import os
import sys

import torch
import transformers as tf
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 61
SEQ = 7

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48)


def families():
    """(name, model class, config) for every family."""
    llama = dict(COMMON, max_position_embeddings=32, rope_theta=100.0)
    return [
        ("llama", tf.LlamaForCausalLM,
         tf.LlamaConfig(**llama, num_key_value_heads=2, tie_word_embeddings=False)),
        ("mistral", tf.MistralForCausalLM,
         tf.MistralConfig(**llama, num_key_value_heads=1, tie_word_embeddings=False)),
        ("qwen2", tf.Qwen2ForCausalLM,
         tf.Qwen2Config(**llama, num_key_value_heads=2, tie_word_embeddings=True)),
        ("gpt2", tf.GPT2LMHeadModel,
         tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                       n_inner=48, bos_token_id=0, eos_token_id=0)),
        ("bert", tf.BertForMaskedLM,
         tf.BertConfig(**COMMON, max_position_embeddings=32)),
        ("roberta", tf.RobertaForMaskedLM,
         tf.RobertaConfig(**COMMON, max_position_embeddings=32, pad_token_id=1)),
        ("distilbert", tf.DistilBertForMaskedLM,
         tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                             max_position_embeddings=32)),
        ("vit", tf.ViTForImageClassification,
         tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, image_size=16, patch_size=8, num_channels=3,
                      num_labels=5)),
    ]


def randomize(model, seed):
    """Every parameter seeded random: norm weights around 1, the rest N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_norm_weight = p.dim() == 1 and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_weight else noise)


def inputs(name, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn((2, 3, 16, 16), generator=g)}
    return {"input_ids": torch.randint(2, VOCAB, (2, SEQ), generator=g)}


def build(name, cls, config, seed=0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    randomize(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def main():
    torch.set_grad_enabled(False)
    only = set(sys.argv[1:])
    for k, (name, cls, config) in enumerate(families()):
        if only and name not in only:
            continue
        model = build(name, cls, config, seed=k)
        x = inputs(name, 100 + k)
        logits = model(**x).logits.float().contiguous()
        out = os.path.join(HERE, name)
        model.save_pretrained(out, safe_serialization=True)
        save_file({**x, "logits": logits}, os.path.join(out, "io.safetensors"))
        extra = os.path.join(out, "generation_config.json")
        if os.path.exists(extra):
            os.remove(extra)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
