"""Tiny random causal LMs and tokenizers built in-process (no hub downloads) for export tests."""
from __future__ import annotations

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "1234 5678 90! Numbers, punctuation; and\nnew lines\n\twith tabs.\n"
) * 4

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(vocab_size: int = 384):
    """A GPT-2-style byte-level BPE tokenizer trained on TEXT, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_llama(vocab_size: int, tie: bool = True, seed: int = 0, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               layers: int = 2, arch: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls_cfg(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.architectures = [cls_model.__name__]
    model = cls_model(cfg).eval()
    with torch.no_grad():  # random init is too flat to tell bugs apart in logits; widen it
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model


def spm_tokenizer(tmp_dir, vocab_size: int = 384):
    """A Llama-2-style SentencePiece BPE tokenizer (byte fallback) trained on TEXT."""
    import shutil

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split("\n") * 20), model_prefix=f"{tmp_dir}/sp", vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    shutil.copy(f"{tmp_dir}/sp.model", f"{tmp_dir}/tokenizer.model")
    return LlamaTokenizer.from_pretrained(tmp_dir)
