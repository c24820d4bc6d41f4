"""The built-in Llama model against transformers' LlamaForCausalLM with the same weights, its KV
cache against full recomputation, generate() options, and the cached pretrained base model."""
import os

import pytest
import torch
from conftest import assert_close

from qlora_fast.models import LlamaConfig, LlamaForCausalLM, PretrainRecipe, generate, load_base_model
from qlora_fast.models.generate import _filter_logits

transformers = pytest.importorskip("transformers")


def small_config(**kw):
    base = dict(
        vocab_size=97, hidden_size=48, intermediate_size=83, num_layers=2, num_heads=6, num_kv_heads=2, max_seq_len=64
    )
    base.update(kw)
    return LlamaConfig(**base)


def hf_twin(model: LlamaForCausalLM):
    """A transformers Llama with the same config and weights (names match one to one)."""
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    hf = transformers.LlamaForCausalLM(hf_config).to(torch.float64)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_logits_match_transformers_llama(seed, tie, kv_heads):
    model = LlamaForCausalLM(small_config(num_kv_heads=kv_heads, tie_embeddings=tie)).double().eval()
    randomize_norms(model)
    hf = hf_twin(model)
    ids = torch.randint(0, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    ours = model(input_ids=ids, attention_mask=mask).logits
    theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert_close(ours[real], theirs[real], atol=1e-10, rtol=1e-9)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(seed):
    model = LlamaForCausalLM(small_config()).double()
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.double()
    terms = []
    for b in range(2):
        for t in range(10):
            if labels[b, t + 1] != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
    assert_close(out.loss, torch.stack(terms).mean(), atol=1e-12, rtol=1e-10)


def test_kv_cache_matches_full_forward(seed):
    model = LlamaForCausalLM(small_config()).double().eval()
    ids = torch.randint(0, 97, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
    pieces, past = [out.logits], out.past_key_values
    for t in range(9, 17):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    assert past[0][0].shape == (2, 2, 17, 8)
    real = mask.bool()
    assert_close(torch.cat(pieces, 1)[real], full[real], atol=1e-10, rtol=1e-9)


def test_inputs_embeds_equal_input_ids(seed):
    model = LlamaForCausalLM(small_config()).double()
    ids = torch.randint(0, 97, (2, 7))
    a = model(input_ids=ids).logits
    b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert_close(a, b, atol=0, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(seed):
    model = LlamaForCausalLM(small_config()).double()
    ids = torch.randint(0, 97, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, plain[n], atol=1e-12, rtol=1e-9, msg=n)


def naive_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence every step (no cache, no padding)."""
    ids = prompt[None]
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0]


def test_generate_greedy_left_padded_batch_matches_single_prompts(seed):
    model = LlamaForCausalLM(small_config()).double().eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (3, T + 6)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, T:], naive_greedy(model, p, 6)[len(p):])


def test_generate_stop_tokens_pad_finished_rows(seed):
    model = LlamaForCausalLM(small_config()).double().eval()
    ids = torch.randint(0, 97, (4, 5))
    free = model.generate(ids, max_new_tokens=8)
    stop = int(free[0, 5 + 2])  # row 0 emits this token at its third new position
    out = model.generate(ids, max_new_tokens=8, stop_token_ids=[stop], pad_token_id=-1)
    for row_free, row in zip(free, out):
        new_free, new = row_free[5:], row[5:]
        hits = (new_free == stop).nonzero()
        if len(hits):
            k = int(hits[0])
            assert torch.equal(new[:k + 1], new_free[:k + 1])
            assert (new[k + 1:] == -1).all()
        else:
            assert torch.equal(new, new_free[:len(new)])
    assert out.shape[1] <= free.shape[1]


def test_filter_logits_top_k_top_p_against_manual(seed):
    logits = torch.randn(5, 31, dtype=torch.float64)
    k_out = _filter_logits(logits, 4, None)
    for row, frow in zip(logits, k_out):
        keep = set(torch.topk(row, 4).indices.tolist())
        assert {i for i in range(31) if torch.isfinite(frow[i])} == keep
    p = 0.7
    p_out = _filter_logits(logits, None, p)
    for row, frow in zip(logits, p_out):
        probs = row.softmax(-1).tolist()
        order = sorted(range(31), key=lambda i: -probs[i])
        keep, total = set(), 0.0
        for i in order:
            keep.add(i)
            total += probs[i]
            if total >= p:
                break
        assert {i for i in range(31) if torch.isfinite(frow[i])} == keep


def test_sampling_is_reproducible_and_top_k_1_is_greedy(seed):
    model = LlamaForCausalLM(small_config()).double().eval()
    ids = torch.randint(0, 97, (2, 4))
    a = generate(
        model, ids, max_new_tokens=7, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )
    b = generate(
        model, ids, max_new_tokens=7, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(a, b)
    greedy = generate(model, ids, max_new_tokens=7)
    assert torch.equal(generate(model, ids, max_new_tokens=7, temperature=0.8, top_k=1), greedy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=50, num_heads=4), "divisible"),
        (dict(num_heads=6, num_kv_heads=4), "multiple"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


def test_generate_takes_eos_lists_and_tiny_temperatures_and_refuses_right_padding(seed):
    model = LlamaForCausalLM(small_config()).double().eval()
    ids = torch.randint(0, 97, (3, 5))
    free = model.generate(ids, max_new_tokens=8)
    first, second = int(free[0, 7]), int(free[1, 6])  # tokens rows 0 and 1 emit
    # eos as a list (transformers' generation configs) stops like those ids given as stop tokens
    stopped = model.generate(ids, max_new_tokens=8, stop_token_ids=[first, second], pad_token_id=-1)
    for eos in ([first, second], torch.tensor([first, second])):
        assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=-1), stopped)
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=torch.tensor(first), pad_token_id=-1),
                       model.generate(ids, max_new_tokens=8, eos_token_id=first, pad_token_id=-1))
    # a temperature far below any logit gap samples the argmax (it used to give NaN probabilities)
    tiny = model.generate(ids, max_new_tokens=8, temperature=1e-40, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(tiny, free)
    right = torch.ones_like(ids)
    right[0, -2:] = 0  # a right-padded prompt
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        model.generate(ids, attention_mask=right)


def test_bad_generate_args_raise():
    model = LlamaForCausalLM(small_config())
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_load_base_model_trains_once_then_loads_the_cache(tmp_path):
    recipe = PretrainRecipe(steps=3, batch_size=2, seq_len=16)
    config = LlamaConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, num_kv_heads=1)
    model, tok = load_base_model(
        cache_dir=str(tmp_path), progress=False, recipe=recipe, config=config, tokenizer="byte"
    )
    (entry,) = os.listdir(tmp_path)
    files = sorted(os.listdir(tmp_path / entry))
    assert files == ["config.json", "model.safetensors"]  # no temp files left behind
    again, _ = load_base_model(cache_dir=str(tmp_path), progress=False, recipe=recipe, config=config, tokenizer="byte")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    fresh = LlamaForCausalLM(config)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert tok.vocab_size == config.vocab_size
    ids = torch.tensor([tok.encode("The capital")])
    assert model.generate(ids, max_new_tokens=3).shape == (1, ids.shape[1] + 3)


def test_an_interrupted_save_model_leaves_the_previous_model_whole(tmp_path, seed, monkeypatch):
    """save_model writes its two files as one unit: a failure on the second (a full disk) over an
    earlier save of a model of the same shapes but another config leaves that model, config and
    weights, exactly as it was (file by file, it left the new weights beside the old config,
    which loaded without complaint as a model that was never saved)."""
    from qlora_fast.models import load_model, save_model

    shape = dict(vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, num_kv_heads=1)
    old = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=10000.0))
    new = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500000.0))
    directory = str(tmp_path / "model")
    save_model(old, directory)
    (tmp_path / "model" / "README.md").write_text("kept")
    real_fsync, calls = os.fsync, []

    def disk_full_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space"):
        save_model(new, directory)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(tmp_path) == ["model"]  # no temporary left behind
    loaded = load_model(directory)
    assert loaded.config == old.config
    for (n, a), (_, b) in zip(old.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    save_model(new, directory)  # a save that completes replaces the unit and keeps the user's file
    assert sorted(os.listdir(directory)) == ["README.md", "config.json", "model.safetensors"]
    assert load_model(directory).config == new.config


def test_load_base_model_with_the_shipped_bpe_has_its_own_cache_entry(tmp_path):
    from qlora_fast.tokenizer import BPETokenizer, ByteTokenizer, load_shipped_bpe

    recipe = PretrainRecipe(steps=3, batch_size=2, seq_len=16)
    shape = dict(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, num_kv_heads=1)
    model, tok = load_base_model(
        cache_dir=str(tmp_path), progress=False, recipe=recipe, config=LlamaConfig(**shape), tokenizer="bpe"
    )
    assert isinstance(tok, BPETokenizer) and model.config.vocab_size == tok.vocab_size  # config's 259 replaced
    assert tok.to_dict() == load_shipped_bpe(cache_dir=str(tmp_path), progress=False).to_dict()
    assert tok.vocab_size > 259  # merges beyond the 256 bytes
    text = "The capital of France is Paris."
    assert len(tok.encode(text)) < len(text.encode())  # BPE compresses the corpus's kind of text
    assert tok.decode(tok.encode(text)) == text
    bases = lambda: sorted(e for e in os.listdir(tmp_path) if e.startswith("base-"))  # noqa: E731
    (bpe_entry,) = bases()
    _, byte_tok = load_base_model(
        cache_dir=str(tmp_path), progress=False, recipe=recipe, config=LlamaConfig(**shape), tokenizer="byte"
    )
    assert isinstance(byte_tok, ByteTokenizer)
    assert len(bases()) == 2 and bpe_entry in bases()  # the tokenizer is part of the cache key
    again, _ = load_base_model(
        cache_dir=str(tmp_path), progress=False, recipe=recipe, config=model.config, tokenizer="bpe"
    )
    assert len(bases()) == 2  # loaded from the cache, not retrained
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="tokenizer"):
        load_base_model(cache_dir=str(tmp_path), progress=False, recipe=recipe, tokenizer="words")


def test_left_pad_matches_flipped_right_padding(seed):
    from qlora_fast.models.generate import left_pad

    rows = [torch.randint(0, 500, (n,)).tolist() for n in torch.randint(0, 9, (5,)).tolist()] + [[7, 8, 9]]
    ids, mask = left_pad(rows, pad_id=511)
    # Reference: right-pad the reversed rows with torch's pad_sequence, then flip back.
    reference = torch.nn.utils.rnn.pad_sequence([torch.tensor(r[::-1], dtype=torch.long) for r in rows],
                                                batch_first=True, padding_value=511).flip(1)
    assert torch.equal(ids, reference)
    assert mask.tolist() == [[0] * (ids.shape[1] - len(r)) + [1] * len(r) for r in rows]
