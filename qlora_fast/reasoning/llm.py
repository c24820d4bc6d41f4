"""Language models for `TreeOfThought`: anything with
`generate(prompts, max_new_tokens, temperature, stop) -> list[str]` (one completion per prompt,
cut before the first stop string) will do. Two adapters ship here:

- `BuiltinLM(model, tokenizer)`: the built-in `qlora_fast.models.LlamaForCausalLM` (with or
  without LoRA/QLoRA adapters applied to it) and a `qlora_fast.tokenizer` tokenizer.
- `HFCausalLM(model, tokenizer)`: a Hugging Face transformers causal LM and its tokenizer.

Both run the whole batch of prompts in one left-padded `generate` call and set `last_usage`
(`Usage(prompt_tokens, completion_tokens)` for the latest call) so the search can count tokens.
`completion_tokens` counts each completion's tokens up to and including the token that ended it
(the end-of-sequence token or the one that completed a stop string), or all `max_new_tokens`.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from qlora_fast.models.generate import left_pad


@dataclass(frozen=True)
class Usage:
    """Tokens of one `generate` call, summed over its prompts."""

    prompt_tokens: int
    completion_tokens: int


def _check_generate_args(prompts, max_new_tokens, temperature, stop) -> Tuple[List[str], List[str]]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be a list of str, found a {type(p).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return list(prompts), stop


def cut_completion(
    new_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stop: Sequence[str], end_ids
) -> Tuple[str, int]:
    """The completion text before the first stop string, and how many of `new_ids` were spent
    on it (up to and including the end token or the token that completed the stop string)."""
    ids = [int(i) for i in new_ids]
    n = len(ids)
    for k, token in enumerate(ids):
        if token in end_ids:
            n = k + 1
            ids = ids[:k]
            break
    text = decode(ids)
    hits = [text.find(s) for s in stop if s in text]
    if not hits:
        return text, n
    # The shortest prefix of tokens whose text already holds a stop string.
    for k in range(1, len(ids) + 1):
        prefix = decode(ids[:k])
        cut = [prefix.find(s) for s in stop if s in prefix]
        if cut:
            return prefix[: min(cut)], k
    return text[: min(hits)], n  # unreachable: the full text holds a stop string


class _BatchedLM:
    """What both `llm` wrappers share: prompts are encoded (each subclass cuts them to fit its
    model), left-padded into one batch, generated in one call with the model in eval mode, and
    each row decoded and cut before the first stop string or end token; `last_usage` counts
    prompt and completion tokens. Subclasses give `model`, `_encode(prompts, max_new_tokens)`,
    `_pad_id()`, `_run(input_ids, attention_mask, max_new_tokens, temperature, stop)` (the output
    ids, prompt columns included), `_decode(ids)` and `_end_ids()`."""

    _EMPTY_PROMPTS = "every prompt encodes to nothing: nothing to condition on"

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, stop=()) -> List[str]:
        """One completion per prompt, cut before the first of `stop`; sets `last_usage`."""
        prompts, stop = _check_generate_args(prompts, max_new_tokens, temperature, stop)
        if not prompts:
            self.last_usage = Usage(0, 0)
            return []
        encoded = self._encode(prompts, max_new_tokens)
        if not any(encoded):
            raise ValueError(self._EMPTY_PROMPTS)
        input_ids, attention_mask = left_pad(encoded, self._pad_id())
        was_training = self.model.training
        self.model.eval()
        try:
            out = self._run(input_ids, attention_mask, max_new_tokens, float(temperature), stop)
        finally:
            self.model.train(was_training)
        texts, completion_tokens = [], 0
        for row in out[:, input_ids.shape[1]:].tolist():
            text, n = cut_completion(row, self._decode, stop, self._end_ids())
            texts.append(text)
            completion_tokens += n
        self.last_usage = Usage(sum(len(ids) for ids in encoded), completion_tokens)
        return texts


class BuiltinLM(_BatchedLM):
    """The built-in model behind the `llm` interface.

    `model` has `generate(input_ids, attention_mask, max_new_tokens, temperature, eos_token_id,
    stop_token_ids, pad_token_id, generator)`: `qlora_fast.models.LlamaForCausalLM`, with or
    without LoRA/QLoRA modules swapped in, or a `qlora_fast.peft` model wrapping it (LoRA, prefix
    or prompt tuning; see `from_pretrained` for loading a saved adapter). `tokenizer` follows
    `qlora_fast.tokenizer.Tokenizer`. Prompts start with the BOS token (as in training) and are
    cut from the left when prompt + `max_new_tokens` would not fit `model.config.max_seq_len`.
    `seed` makes sampling (temperature > 0) reproducible.
    """

    _EMPTY_PROMPTS = "every prompt is empty and add_bos is False: nothing to condition on"

    def __init__(self, model, tokenizer, seed: Optional[int] = None, add_bos: bool = True):
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must have a generate() method, got {type(model).__name__}")
        for attr in ("encode", "decode", "pad_id", "eos_id"):
            if not hasattr(tokenizer, attr):
                raise TypeError(f"tokenizer must follow qlora_fast.tokenizer.Tokenizer (missing {attr!r})")
        self.model = model
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self._device())
            self.generator.manual_seed(seed)
        self.last_usage: Optional[Usage] = None

    @classmethod
    def from_pretrained(cls, adapter: Optional[str] = None, cache_dir: Optional[str] = None, device=None,
                        seed: Optional[int] = None, progress: bool = True, tokenizer: str = "bpe") -> "BuiltinLM":
        """The built-in base model (`qlora_fast.models.load_base_model`, with `tokenizer` "bpe" or
        "byte"), with the adapter saved at `adapter` (`qlora_fast.peft.save_adapter`) loaded on
        top when given."""
        from qlora_fast.models import load_base_model

        model, tokenizer = load_base_model(cache_dir=cache_dir, progress=progress, tokenizer=tokenizer)
        if device is not None:
            model = model.to(device)
        if adapter is not None:
            from qlora_fast.peft import load_adapter

            model = load_adapter(model, adapter)
        return cls(model.eval(), tokenizer, seed=seed)

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _max_prompt_tokens(self, max_new_tokens: int) -> Optional[int]:
        config = getattr(self.model, "config", None)
        max_len = getattr(config, "max_seq_len", None)
        if max_len is None:
            return None
        # Prompt/prefix tuning (qlora_fast.peft) puts virtual tokens in front of every prompt.
        virtual = getattr(getattr(self.model, "peft_config", None), "num_virtual_tokens", 0) or 0
        room = max_len - virtual - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={max_len}"
                             + (f" ({virtual} virtual tokens)" if virtual else ""))
        return room

    def _encode(self, prompts, max_new_tokens):
        tok, limit = self.tokenizer, self._max_prompt_tokens(max_new_tokens)
        encoded = []
        for prompt in prompts:
            ids = tok.encode(prompt, add_bos=self.add_bos) if self.add_bos else tok.encode(prompt)
            encoded.append(ids[-limit:] if limit is not None else ids)
        return encoded

    def _pad_id(self) -> int:
        return self.tokenizer.pad_id

    def _run(self, input_ids, attention_mask, max_new_tokens, temperature, stop):
        tok, device = self.tokenizer, self._device()
        # Stop strings that are one token stop generation in the model; longer ones are cut after.
        stop_ids = sorted({ids[0] for ids in (tok.encode(s) for s in stop) if len(ids) == 1})
        return self.model.generate(
            input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            temperature=temperature, eos_token_id=tok.eos_id, stop_token_ids=stop_ids or None,
            pad_token_id=tok.pad_id, generator=self.generator,
        )

    def _decode(self, ids):
        return self.tokenizer.decode(ids)

    def _end_ids(self):
        return {self.tokenizer.eos_id}


class _StopOnStrings:
    """A transformers stopping criterion: a row is done once its new text holds a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, self.prompt_width:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(any(s in text for s in self.stop))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFCausalLM(_BatchedLM):
    """A Hugging Face transformers causal LM behind the `llm` interface.

    Prompts are tokenized with the tokenizer's special tokens, cut from the left to fit
    `config.max_position_embeddings` with the new tokens, left-padded (the pad token falls back
    to EOS when the tokenizer has none) and generated in one `model.generate` call: greedy at
    temperature 0, sampling otherwise (seed torch for reproducible samples). Stop strings end a
    row as soon as its text holds one.
    """

    _EMPTY_PROMPTS = "every prompt tokenizes to nothing: nothing to condition on"

    def __init__(self, model, tokenizer):
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must be a transformers causal LM with generate(), got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.last_usage: Optional[Usage] = None

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        if tok.eos_token_id is not None:
            return tok.eos_token_id
        raise ValueError("the tokenizer has neither a pad nor an eos token: cannot pad a batch")

    def _encode(self, prompts, max_new_tokens):
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        # Learned position tables (GPT-2) cannot go past max_position_embeddings: cut from the left.
        max_len = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if max_len is not None:
            if max_new_tokens >= max_len:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_position_embeddings={max_len}"
                )
            encoded = [ids[-(max_len - max_new_tokens):] for ids in encoded]
        return encoded

    def _run(self, input_ids, attention_mask, max_new_tokens, temperature, stop):
        tok = self.tokenizer
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self._pad_id())
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        if stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tok, stop, input_ids.shape[1])])
        device = next(self.model.parameters()).device
        return self.model.generate(input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _end_ids(self):
        return {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
