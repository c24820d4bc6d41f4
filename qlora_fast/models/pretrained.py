"""The tiny built-in base model: a `LlamaForCausalLM` pretrained on the shipped corpus with the
BPE trained on that corpus (or, on request, the byte tokenizer), trained on first use (about two
minutes on two idle CPU cores) and cached on disk.

The cache file name carries a hash of the config, the training recipe, the tokenizer and the
corpus, so a change to any of them trains a new model instead of loading a stale one.
"""
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch

from qlora_fast.utils import atomic_write_dir, default_cache_dir

from .llama import LlamaConfig, LlamaForCausalLM

BASE_CONFIG = LlamaConfig(
    vocab_size=259, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
    max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
)


@dataclass
class PretrainRecipe:
    """How the base model is pretrained (part of the cache key)."""

    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0


def save_model(model: LlamaForCausalLM, directory: str) -> None:
    """Write `config.json` and `model.safetensors` into `directory` as one unit (`atomic_write_dir`):
    an interrupted save leaves the previous model there whole, never its config beside new weights."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    files = {"model.safetensors": save(state), "config.json": json.dumps(model.config.to_dict(), indent=2).encode()}
    atomic_write_dir(directory, files, what="model directory")


def load_model(directory: str, device=None) -> LlamaForCausalLM:
    """Load a model written by `save_model`. A missing file raises FileNotFoundError; a truncated
    or corrupt one ValueError naming it."""
    from safetensors.torch import load_file

    from qlora_fast.utils import read_json

    config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    try:
        config = LlamaConfig(**read_json(config_path, "model config"))
    except TypeError as e:
        raise ValueError(f"model config {config_path!r} does not describe a LlamaConfig: {e}") from e
    model = LlamaForCausalLM(config)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no model weights at {weights_path!r}")
    try:
        state = load_file(weights_path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # a tied head may be saved without lm_head.weight (it is the embedding); nothing else may miss
        allowed = {"lm_head.weight"} if config.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(f"missing keys {sorted(set(missing) - allowed)[:5]}, unexpected keys {unexpected[:5]}")
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated file
        raise ValueError(f"model weights {weights_path!r} are unreadable or do not fit {config_path!r} "
                         f"(truncated or corrupt?): {e}") from e
    return model.to(device) if device is not None else model


def _tokenizer_key(tokenizer) -> str:
    """What identifies a tokenizer's ids: its class and, for a BPE, its ranks and special tokens."""
    if hasattr(tokenizer, "to_dict"):
        return type(tokenizer).__name__ + json.dumps(tokenizer.to_dict(), sort_keys=True)
    return type(tokenizer).__name__


def _cache_key(config: LlamaConfig, recipe: PretrainRecipe, corpus: str, tokenizer) -> str:
    blob = json.dumps({"config": config.to_dict(), "recipe": asdict(recipe), "v": 1}, sort_keys=True) + corpus
    if type(tokenizer).__name__ != "ByteTokenizer":  # byte keys stay as before, so existing caches still load
        blob += _tokenizer_key(tokenizer)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrain(model: LlamaForCausalLM, ids: torch.Tensor, recipe: PretrainRecipe, progress: bool = True) -> list:
    """Train `model` on random windows of the token stream `ids` (1-D LongTensor) with AdamW and a
    warmup + cosine schedule. Returns the loss per step."""
    from tqdm.auto import tqdm

    if ids.numel() <= recipe.seq_len + 1:
        raise ValueError(f"the corpus must hold more than seq_len + 1 = {recipe.seq_len + 1} tokens, got {ids.numel()}")
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95))

    def lr_at(step):
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="pretraining base model", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - recipe.seq_len, (recipe.batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


TOKENIZERS = ("bpe", "byte")


def base_tokenizer(tokenizer: str = "bpe", cache_dir: Optional[str] = None, progress: bool = True):
    """The tokenizer of the built-in base model: "bpe" (the BPE trained on the shipped corpus,
    `load_shipped_bpe` at its default vocabulary, cached in `cache_dir`) or "byte" (`ByteTokenizer`)."""
    if tokenizer == "bpe":
        from qlora_fast.tokenizer.bpe import load_shipped_bpe

        return load_shipped_bpe(cache_dir=cache_dir or default_cache_dir(), progress=progress)
    if tokenizer == "byte":
        from qlora_fast.tokenizer.base import ByteTokenizer

        return ByteTokenizer()
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")


def load_base_model(cache_dir: Optional[str] = None, progress: bool = True, recipe: Optional[PretrainRecipe] = None,
                    config: Optional[LlamaConfig] = None, tokenizer: str = "bpe") -> Tuple[LlamaForCausalLM, "object"]:
    """The tiny base model pretrained on the shipped corpus, and its tokenizer.

    tokenizer: "bpe" (default: the 384-token BPE trained on the shipped corpus, `load_shipped_bpe`,
    itself cached in `cache_dir`) or "byte" (`ByteTokenizer`); anything else raises ValueError.
    Both tune about equally well on the shipped instructions (bench/RESULTS.md); an adapter
    trained on one base refuses to load onto the other.
    `config` (default `BASE_CONFIG`) gives the shape; its vocab_size is replaced by the tokenizer's.
    Loaded from `cache_dir` (default `default_cache_dir()`) when present, else pretrained (tqdm bar
    when `progress`) and saved there atomically; the cache key covers the config, the recipe, the
    tokenizer and the corpus. The model is returned in eval mode on the CPU.
    """
    from dataclasses import replace

    from qlora_fast.data import load_corpus

    cache_dir = cache_dir or default_cache_dir()
    tok = base_tokenizer(tokenizer, cache_dir=cache_dir, progress=progress)
    # The embedding and head must fit the tokenizer, whatever vocab_size the config was built with.
    config = replace(config or BASE_CONFIG, vocab_size=tok.vocab_size)
    recipe = recipe or PretrainRecipe()
    corpus = load_corpus()
    directory = os.path.join(cache_dir, f"base-{_cache_key(config, recipe, corpus, tok)}")
    if os.path.exists(os.path.join(directory, "model.safetensors")) and os.path.exists(
        os.path.join(directory, "config.json")
    ):
        try:
            return load_model(directory).eval(), tok
        except (OSError, ValueError) as e:  # a damaged cache entry: rebuild it rather than fail every later run
            warnings.warn(
                f"the cached base model in {directory} is unreadable ({e}); pretraining it again", stacklevel=2
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
    ids = torch.tensor(tok.encode(corpus), dtype=torch.long)
    pretrain(model, ids, recipe, progress=progress)
    save_model(model, directory)
    return model.eval(), tok
