"""A tiny random-weight Llama and its tokenizer, built offline for vLLM engine tests.

`build_tiny_model(folder)` writes a Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) that `vllm.LLM(model=folder)`
loads without touching a model hub: a 2-layer Llama (hidden 64, 2 heads of dim 32; vLLM's CPU
attention rejects head_dim 16) with weights from a fixed torch seed, and a byte-level BPE
tokenizer trained here on a generated corpus. Same inputs, same bytes: deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# The tiny model's chat template (Zephyr's layout): BOS once, each message as "<|role|>\n" + its
# content + EOS, then "<|assistant|>\n" when a generation prompt is asked for.  Only BOS and EOS
# are special tokens; the role markers are plain text.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3
TOKENIZER_VOCAB = 2000  # the BPE trainer's target; the config's vocab_size is the tokenizer's size
SEED = 0

# The in-process vLLM engine tests and `loadtest.sim_to_real` run on the tiny model (any
# `vllm.LLM` argument; callers override): 64 MiB of KV cache (65,536 tokens for the tiny model;
# without the setting vLLM takes 92 % of RAM), eager mode (no torch.compile), no prefix caching
# (schedules stay reproducible), a fixed seed.
TINY_ENGINE_ARGS: dict = dict(
    dtype="float32",
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    max_model_len=1024,
    max_num_seqs=16,
    max_num_batched_tokens=256,
    enable_prefix_caching=False,
    seed=0,
)

_SYLLABLES = [
    c + v
    for c in ("", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr")
    for v in ("a", "e", "i", "o", "u", "ai", "ou")
]


def _corpus(n_lines: int = 3000, seed: int = SEED) -> list[str]:
    """Deterministic pseudo-English: words of 1-4 syllables, a few digits and punctuation."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += ["the", "a", "of", "and", "to", "in", "is", "that", "for", "it", "hello", "world"]
    lines = []
    for _ in range(n_lines):
        toks = [rng.choice(words) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.2:
            toks.append(str(rng.randint(0, 999)))
        lines.append(" ".join(toks).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return lines


def train_tokenizer():
    """The built-in byte-level BPE, trained on `_corpus()`: a `tokenizers.Tokenizer` (every string
    encodes, no <unk>; no post-processor, so encoding adds no BOS).  Deterministic; needs only the
    `tokenizers` package (no torch, no transformers).  The ingress's default tokenizer
    (`serve_app.tokenizer.default_tokenizer`) and the tiny model's (`build_tokenizer`) are this one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(folder: Path, chat_template: str | None = TINY_CHAT_TEMPLATE):
    """Train the byte-level BPE (`train_tokenizer`), add BOS on encode, save it as a fast tokenizer
    with ``chat_template`` (None: none; chat requests to a server of this model are then refused)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer()
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, chat_template: str | None = TINY_CHAT_TEMPLATE) -> Path:
    """Write the tiny model and tokenizer (with ``chat_template``) into `folder` (created if
    needed); return `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, chat_template)
    # vocab_size == the tokenizer's size: the random model can only emit ids the tokenizer decodes.
    vocab_size = len(tokenizer)
    assert 1000 <= vocab_size <= TOKENIZER_VOCAB, vocab_size
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    assert ids == {UNK: 0, BOS: 1, EOS: 2, PAD: 3}, ids

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False
    ).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    out = build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
    print(f"built {out} in {time.perf_counter() - t0:.2f}s")
