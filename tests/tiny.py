"""Tiny fixtures' building blocks shared by the test files: a short chat-like training text for
small tokenizers, a depth-2, width-64 GPT whose every weight is random, and that GPT saved as a
checkpoint with a tokenizer trained on the text.

The model's default init zeroes the output projections, which makes every block the identity
and would hide bugs in attention or the cache; random weights make every layer change the output.
"""

import dataclasses
import math

import torch

from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CHAT_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "What is 12 plus 30? It is 42. How many r are in strawberry? There are 3. " * 20,
    "Once upon a time a small model learned to count and to add numbers like 7 + 5 = 12. " * 20,
]


def random_gpt(vocab_size: int, window_pattern: str = "SL", sequence_len: int = 32, seed: int = 0) -> GPT:
    """A depth-2, width-64 GPT (4 query heads, 2 kv heads) with every weight random, in eval mode."""
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern=window_pattern)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.size(1)))
        model.transformer.wte.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.5)
        model.resid_lambdas.uniform_(0.7, 1.3)
        model.x0_lambdas.uniform_(0.0, 0.5)
        # Init 0 would switch the smear off; much larger values make the few-step training
        # tests of chat_sft diverge.
        model.smear_lambda.fill_(0.3)
        model.backout_lambda.fill_(0.2)
    return model.eval()


def save_tiny_checkpoint(source: str, model_tag: str, tokenizer_dir: str, *, step: int = 0, sequence_len: int = 32,
                         meta: dict | None = None):
    """random_gpt saved as step `step` of the `source` checkpoint `model_tag` (base, sft or rl) in
    the session's NANOCHAT_BASE_DIR, with a 300-token tokenizer trained on CHAT_TEXT saved into
    `tokenizer_dir` and copied along; `meta` adds to the checkpoint's meta. Returns (model, tokenizer)."""
    tokenizer = Tokenizer.train_from_iterator(iter(CHAT_TEXT), vocab_size=300)
    tokenizer.save(tokenizer_dir)
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=sequence_len)
    save_checkpoint(checkpoint_dir(source, model_tag), step, model.state_dict(),
                    {"model_config": dataclasses.asdict(model.config), **(meta or {})}, tokenizer_dir=tokenizer_dir)
    return model, tokenizer
