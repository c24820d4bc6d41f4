"""FSDP2 with the 4-bit base sharded (qlora_fast.distributed), on CPU with gloo and 2 processes.

The oracle is single-process training of the same model on the same global batch (plain
`Linear4bit` bases, no sharding) with torch's own AdamW."""
import copy
import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from fsdp_worker import (
    adapters,
    build_model,
    build_moe_model,
    dcp_worker,
    fsdp_worker,
    global_batch,
    make_optimizer,
    moe_fsdp_worker,
    perturb_adapters,
    train,
)
from grpo_fsdp_worker import grpo_fsdp_worker
from torch import nn

from qlora_fast.distributed import (
    ShardableLinear4bit,
    four_bit_bytes,
    load_adapter_checkpoint,
    prepare_4bit_for_fsdp,
    save_adapter_checkpoint,
    shard_qlora_model,
)
from qlora_fast.distributed.fsdp import unit_layout
from qlora_fast.nn import Linear4bit, QLoRALinear


def assert_adam_close(actual, expected, name):
    """Adapters after a few Adam steps, from gradients summed in another order (reduce-scatter vs
    one process). Adam divides by sqrt(v), so an entry whose gradient is ~0 moves by up to a whole
    step (lr) on rounding alone: all but 1% of the entries must agree to 5e-5 (0.5% of a step),
    and none may be off by more than the total step size LR * STEPS."""
    from fsdp_worker import LR, STEPS

    diff = (actual - expected).abs()
    off = (diff > 5e-5 + 1e-4 * expected.abs()).float().mean().item()
    assert off <= 0.01, f"{name}: {off:.2%} of the entries differ"
    assert diff.max().item() <= LR * STEPS, f"{name}: max difference {diff.max().item():.3g}"


@pytest.mark.parametrize("double_quant", [True, False])
def test_shardable_layout_is_the_same_weight(seed, double_quant):
    """The unit layout dequantizes to the same weight, forward and input gradient as the plain
    module, and converts back losslessly."""
    torch.manual_seed(seed)
    lin = nn.Linear(512, 96)
    with torch.no_grad():
        lin.weight[3, 7] = 40.0  # an outlier block
    plain = QLoRALinear.from_linear(lin, r=3, compress_statistics=double_quant)
    with torch.no_grad():
        plain.lora_B.normal_()
    x = torch.randn(5, 512, requires_grad=True)
    ref = plain(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad, None
    base = plain.base
    model = prepare_4bit_for_fsdp(nn.Sequential(plain))
    shardable = model[0].base
    assert isinstance(shardable, ShardableLinear4bit)
    unit = 64 * (256 if double_quant else 1)
    assert tuple(shardable.units.shape) == (512 * 96 // unit, unit // 2 + (256 + 4 if double_quant else 4))
    torch.testing.assert_close(shardable.dequantize_weight(), base.dequantize_weight(), rtol=0, atol=0)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # what autograd keeps for the backward are views of `units` (under FSDP2: of its unsharded
    # storage, freed after the forward), not copies of the 4-bit bytes
    node = out.grad_fn
    while not hasattr(node, "weight"):
        node = node.next_functions[0][0]
    kept, kept_state = node.weight
    storage = shardable.units.untyped_storage().data_ptr()
    tensors = [kept, kept_state.absmax] + ([kept_state.nested_absmax] if double_quant else [])
    assert all(t.untyped_storage().data_ptr() == storage for t in tensors)
    out.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    back = shardable.to_linear4bit()
    torch.testing.assert_close(back.dequantize_weight(), base.dequantize_weight(), rtol=0, atol=0)
    # the 4-bit size: half a byte per element plus the block scales
    expected = 512 * 96 // 2 + (512 * 96 // 64 + 4 * 512 * 96 // unit if double_quant else 4 * 512 * 96 // 64)
    assert four_bit_bytes(model) == expected


@pytest.mark.parametrize("rows", [5, 20])  # the skinny decode kernel, and dequantize + matmul
def test_shardable_layout_on_the_kernel_path(seed, rows, monkeypatch):
    """The Triton kernels index flat buffers while a ShardableLinear4bit hands them strided views
    of `units`: on the kernel path it must compute exactly what the plain module computes (before
    QuantState.kernel_weight copied the views for the call, the outputs were garbage/NaN)."""
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")  # the kernels, in the interpreter on the CPU
    torch.manual_seed(seed)
    plain = QLoRALinear.from_linear(nn.Linear(256, 128), r=2)
    with torch.no_grad():
        plain.lora_B.normal_()
    x = torch.randn(rows, 256, requires_grad=True)
    ref = plain(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad, None
    base = plain.base
    model = prepare_4bit_for_fsdp(nn.Sequential(plain))
    assert isinstance(model[0].base, ShardableLinear4bit) and not model[0].base.weight.is_contiguous()
    # dequantize_4bit too (merge and merge_linear_layers start from it): its nested absmax is a
    # view with stride 2113 into `units`
    torch.testing.assert_close(model[0].base.dequantize_weight(), base.dequantize_weight(), rtol=0, atol=0)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("in_features, out_features, double_quant", [(256, 128, True), (200, 96, False)])
def test_merge_and_unmerge_on_a_shardable_base(seed, monkeypatch, backend, in_features, out_features, double_quant):
    """QLoRALinear.merge/unmerge on a ShardableLinear4bit base (prepare_4bit_for_fsdp, before
    sharding) requantize to exactly what they give on the plain Linear4bit base, in the unit layout."""
    monkeypatch.setenv("QLORA_FAST_BACKEND", backend)
    torch.manual_seed(seed)
    plain = QLoRALinear.from_linear(nn.Linear(in_features, out_features), r=3, compress_statistics=double_quant)
    with torch.no_grad():
        plain.lora_B.normal_()
    shardable = copy.deepcopy(plain)
    prepare_4bit_for_fsdp(nn.Sequential(shardable))
    x = torch.randn(3, in_features)
    for step in ("merge", "unmerge"):
        getattr(plain, step)()
        getattr(shardable, step)()
        assert isinstance(shardable.base, ShardableLinear4bit), step
        torch.testing.assert_close(shardable.base.dequantize_weight(), plain.base.dequantize_weight(), rtol=0, atol=0)
        torch.testing.assert_close(shardable(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="this module's format"):
        shardable.base.set_quantized(plain.base.weight, dataclasses.replace(plain.base.quant_state, blocksize=128))


def test_bad_setups_raise_clear_errors():
    odd = nn.Sequential(Linear4bit.from_linear(nn.Linear(100, 30)), Linear4bit.from_linear(nn.Linear(256, 64)))
    with pytest.raises(ValueError, match=r"0: a \(30, 100\) 4-bit weight .*-block boundaries"):
        prepare_4bit_for_fsdp(odd)
    assert type(odd[1]) is Linear4bit  # nothing swapped on failure
    prepare_4bit_for_fsdp(odd, unsplittable="replicate")  # the (30, 100) one stays whole, the other is swapped
    assert type(odd[0]) is Linear4bit and type(odd[1]) is ShardableLinear4bit
    with pytest.raises(ValueError, match="unsplittable must be 'error' or 'replicate'"):
        prepare_4bit_for_fsdp(odd, unsplittable="skip")
    with pytest.raises(TypeError, match="must be a qlora_fast.nn.Linear4bit"):
        ShardableLinear4bit.from_linear4bit(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        shard_qlora_model(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("double_quant, optimizer, hf", [(True, "torch.AdamW", False), (False, "PagedAdamW", True)],
                         ids=["builtin-nested-AdamW", "transformers-PagedAdamW"])
def test_fsdp2_two_ranks_match_one_process(tmp_path, seed, double_quant, optimizer, hf):
    """2-rank FSDP2 QLoRA training == single-process training of the global batch; each rank
    holds half the 4-bit bytes; the all-gathers move the 4-bit bytes, not a dense copy. The paged
    optimizer steps each rank's DTensor shards (its states are those of the local shard). Models:
    the built-in Llama and a tiny transformers Llama from a config."""
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed, double_quant, optimizer, hf),
             nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]

    model = build_model(seed, double_quant, hf)
    n_4bit = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear4bit))
    opt = make_optimizer(model, optimizer)
    ref_losses = train(model, opt, global_batch(seed))
    ref_adapters = adapters(model)

    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        assert r["adapters"].keys() == ref_adapters.keys()
        for name, value in ref_adapters.items():
            assert_adam_close(r["adapters"][name], value, name)
    if optimizer != "torch.AdamW":
        # bf16 adapter compute (MixedPrecisionPolicy) tracks the fp32 run to bf16 precision
        torch.testing.assert_close(torch.tensor(ranks[0]["mp_losses"]), torch.tensor(ref_losses), rtol=4e-3, atol=0)
        assert ranks[0]["mp_losses"] != ref_losses  # the policy took effect
        global_elems = sum(v.numel() for v in ref_adapters.values())
        assert [r["state_elems"] for r in ranks] == [r["local_elems"] for r in ranks]
        assert sum(r["state_elems"] for r in ranks) == global_elems
    # memory: each rank stores its whole units of every weight, half of them (the MLP weights have
    # 5 units with double quantization: uneven shards, 3 on rank 0 and 2 on rank 1)
    full = ranks[0]["full_4bit"]
    assert n_4bit < full < n_4bit * 1.2  # packed nibbles (n_4bit bytes) plus the block scales
    layouts = [unit_layout(tuple(m.quant_state.shape), 64, double_quant) for m in model.modules()
               if isinstance(m, Linear4bit)]
    assert sum(n * b for n, b in layouts) == full
    first = sum(-(-n // 2) * b for n, b in layouts)
    assert [r["local_4bit"] for r in ranks] == [first, full - first]
    assert full - first >= 0.4 * full
    # communication: in one step each FSDP unit (2 decoder layers, the root) gathers its unsharded
    # (padded) parameters for its forward and again for its backward (all resharded after forward);
    # the 4-bit part of that is `full` bytes, not 2 bytes per element
    sizes = ranks[0]["unsharded"]
    layer_bytes = {}
    for name, size in sizes.items():
        key = next((f"layers.{i}." for i in range(2) if f"layers.{i}." in name), "root")
        layer_bytes[key] = layer_bytes.get(key, 0) + size
    gathered = ranks[0]["gathered"]
    assert sorted(gathered) == sorted([layer_bytes[k] for k in ("root", "layers.0.", "layers.1.")] * 2)
    four_bit_in_gathers = sum(s for n, s in sizes.items() if n.endswith("units"))
    assert four_bit_in_gathers == 2 * first  # the 4-bit bytes, with FSDP2's padding of uneven shards
    assert len(ranks[0]["held_after_forward"]) == 14 and not any(ranks[0]["held_after_forward"])
    dense = 2 * n_4bit * 2  # what a bf16 copy of the same weights would be
    assert sum(gathered) < dense


def test_fsdp2_on_a_4bit_mixtral_matches_one_process(tmp_path, seed):
    """Fused MoE experts in 4 bits (Experts4bit) under FSDP2: each expert weight's packed bytes are
    sharded (a DTensor) and gathered for the forward; 2 ranks == one process on the global batch."""
    mp.spawn(moe_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    model = build_moe_model(seed)
    ref_losses = train(model, make_optimizer(model), global_batch(seed))
    ref_adapters = adapters(model)
    for r in ranks:
        assert len(r["sharded"]) == 4  # gate_up_proj and down_proj of 2 layers
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        for name, value in ref_adapters.items():
            assert_adam_close(r["adapters"][name], value, name)


def test_dcp_checkpoint_resume_on_two_ranks_and_load_on_one(tmp_path, seed):
    """DCP save of adapters + optimizer state (torch AdamW, PagedAdamW, PagedAdamW8bit) on 2 ranks;
    a fresh 2-rank run that loads it has the same states and continues bit-identically; one process
    loads the same adapters and optimizer state (8-bit: the same wherever blocks line up)."""
    mp.spawn(dcp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        (saved, losses, final, _), (loaded, losses2, final2, _) = r["first"], r["second"]
        assert losses == losses2  # bit-identical continuation
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), name
            assert torch.equal(final[name], final2[name]), name
    assert not os.path.exists(tmp_path / "ckpt.partial")
    eight = []
    for rank in range(2):  # the same with PagedAdamW and PagedAdamW8bit (states saved as DTensor shards)
        for kind in ("paged", "eight"):
            (saved_p, losses_p, final_p, states), (loaded_p, losses_p2, final_p2, states2) = torch.load(
                os.path.join(tmp_path, f"rank{rank}.pt"))[kind]
            assert losses_p == losses_p2, kind
            for name in saved_p:
                assert torch.equal(saved_p[name], loaded_p[name]) and torch.equal(final_p[name], final_p2[name]), name
            for name, state in states.items():  # the loaded optimizer states are the saved ones, bit for bit
                assert state["kind"] == ("8bit" if kind == "eight" else "32bit")
                assert state["step"] == states2[name]["step"]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, states2[name][key]), (kind, name, key)
        eight.append(torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))["eight"][0][3])
    # world size 1, no process group: same adapters; the optimizer state continues the same run
    model = build_model(seed)
    perturb_adapters(model, seed + 3)
    opt = make_optimizer(model)
    extra = load_adapter_checkpoint(model, opt, tmp_path / "ckpt")
    assert extra["step"] == 1 and extra["history"] == [{"loss": 1.5}]
    for name, value in adapters(model).items():
        assert torch.equal(value, saved[name]), name
    one_losses = train(model, opt, global_batch(seed)[1:])
    ranks_mean = [sum(pair) / 2 for pair in zip(*(torch.load(os.path.join(tmp_path, f"rank{k}.pt"))["first"][1]
                                                    for k in range(2)))]
    torch.testing.assert_close(torch.tensor(one_losses), torch.tensor(ranks_mean), rtol=1e-5, atol=1e-6)
    for name, value in adapters(model).items():
        assert_adam_close(value, final[name], name)
    # the 8-bit states on one process (unpaged AdamW8bit): where rank 0's shard is whole 256-blocks
    # the two ranks' codes and absmax concatenate bit for bit; elsewhere a block that straddles the
    # shards is requantized: each value within half a code step (<= 0.00703 of its block's absmax)
    from qlora_fast.reference.optim import QUANT_BLOCK, dequantize_blockwise_ref, dynamic_map

    model8 = build_model(seed)
    perturb_adapters(model8, seed + 4)
    opt8 = make_optimizer(model8, "AdamW8bit")
    load_adapter_checkpoint(model8, opt8, tmp_path / "eight")
    for name, value in adapters(model8).items():
        assert torch.equal(value, torch.load(os.path.join(tmp_path, "rank0.pt"))["eight"][0][0][name]), name
    paths = {"exact": 0, "requantized": 0}
    for name, p in model8.named_parameters():
        if not p.requires_grad:
            continue
        one, parts = opt8._flat_state(opt8.state[p]), [e[name] for e in eight]
        assert one["kind"] == "8bit" and one["step"] == parts[0]["step"] == 1
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = one[key + "_codes"], one[key + "_absmax"]
            if parts[0][key + "_codes"].numel() % QUANT_BLOCK == 0:
                paths["exact"] += 1
                assert torch.equal(codes, torch.cat([q[key + "_codes"] for q in parts])), (name, key)
                assert torch.equal(absmax, torch.cat([q[key + "_absmax"] for q in parts])), (name, key)
                continue
            paths["requantized"] += 1
            code = dynamic_map(signed)
            want = torch.cat([dequantize_blockwise_ref(q[key + "_codes"], q[key + "_absmax"], code) for q in parts])
            got = dequantize_blockwise_ref(codes, absmax, code)
            bound = 0.00704 * absmax.repeat_interleave(QUANT_BLOCK)[: got.numel()]
            assert ((got - want).abs() <= bound).all(), (name, key)
            assert (want.abs().max() > 0) and absmax.max() > 0
    assert paths["exact"] > 0 and paths["requantized"] > 0, paths
    # a failed load (one adapter of another shape) leaves the model and optimizer as they were
    other = build_model(seed)
    perturb_adapters(other, seed + 5)
    layer = other.get_submodule("base_model.model.layers.1.mlp.down_proj")
    layer.lora_A = nn.Parameter(torch.randn(5, layer.lora_A.shape[1]))
    other_opt = make_optimizer(other)
    before = {n: p.detach().clone() for n, p in other.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="does not match this model/optimizer"):
        load_adapter_checkpoint(other, other_opt, tmp_path / "ckpt")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters() if p.requires_grad)
    assert not other_opt.state
    with pytest.raises(FileNotFoundError):
        load_adapter_checkpoint(other, other_opt, tmp_path / "missing")
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter_checkpoint(model, opt, tmp_path / "ckpt")


@pytest.mark.parametrize("name", ["torch.AdamW", "AdamW8bit"])
def test_checkpoint_of_an_optimizer_that_has_not_stepped(tmp_path, seed, name):
    """torch's DCP helpers create optimizer states by a zero-lr step: saving before the first step
    used to count that step (the next real step then differed), and loading into a fresh optimizer
    whose parameters already had gradients silently loaded no optimizer state. A path with a
    trailing slash used to leave a half-renamed folder. One process, no process group."""
    batches = global_batch(seed)
    model, twin = build_model(seed), build_model(seed)
    opt, twin_opt = make_optimizer(model, name), make_optimizer(twin, name)
    save_adapter_checkpoint(model, opt, str(tmp_path / "fresh") + "/")  # before any step
    assert not opt.state and os.listdir(tmp_path) == ["fresh"]
    assert train(model, opt, batches[:2]) == train(twin, twin_opt, batches[:2])  # the save changed nothing
    for name_, value in adapters(model).items():
        assert torch.equal(value, adapters(twin)[name_]), name_
    # resuming from the pre-step checkpoint trains as a fresh optimizer does
    resumed = build_model(seed)
    resumed_opt = make_optimizer(resumed, name)
    load_adapter_checkpoint(resumed, resumed_opt, tmp_path / "fresh")
    fresh = build_model(seed)
    assert train(resumed, resumed_opt, batches[:1]) == train(fresh, make_optimizer(fresh, name), batches[:1])
    # a stepped checkpoint loads its optimizer state even where the model already has gradients
    save_adapter_checkpoint(model, opt, tmp_path / "stepped")
    target = build_model(seed)
    target(input_ids=batches[0], labels=batches[0]).loss.backward()
    target_opt = make_optimizer(target, name)
    load_adapter_checkpoint(target, target_opt, tmp_path / "stepped")
    steps = [int(s["step"]) for s in target_opt.state.values()]
    assert len(steps) == len(opt.state) and set(steps) == {2}
    assert train(target, target_opt, batches[2:3]) == train(model, opt, batches[2:3])


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_overwriting_a_checkpoint_folder_is_all_or_nothing(tmp_path, seed, monkeypatch, swap):
    """overwrite=True: the new folder replaces the old one whole (one atomic swap on Linux, else
    two renames), nothing left beside it; a save that fails half-way leaves the old one as it was.
    One process, no process group. Oracle: the adapters as trained, read back."""
    import qlora_fast.distributed.checkpoint as ckpt

    if swap == "two renames":
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    model = build_model(seed)
    opt = make_optimizer(model)
    path = tmp_path / "ckpt"
    save_adapter_checkpoint(model, opt, path, extra={"step": 0})
    first = adapters(model)
    train(model, opt, global_batch(seed)[:1])
    save_adapter_checkpoint(model, opt, path, extra={"step": 1}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    second = adapters(model)
    loaded = build_model(seed)
    assert load_adapter_checkpoint(loaded, make_optimizer(loaded), path) == {"step": 1}
    assert all(torch.equal(v, second[k]) for k, v in adapters(loaded).items())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.distributed.checkpoint, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter_checkpoint(model, opt, path, extra={"step": 2}, overwrite=True)
    monkeypatch.undo()
    again = build_model(seed)
    assert load_adapter_checkpoint(again, make_optimizer(again), path) == {"step": 1}
    assert all(torch.equal(v, second[k]) for k, v in adapters(again).items())
    assert any(not torch.equal(v, first[k]) for k, v in second.items())  # the two saves differ


def test_failed_trainer_checkpoint_load_changes_nothing(tmp_path, seed):
    from qlora_fast.distributed import load_trainer_checkpoint, save_trainer_checkpoint

    model = build_model(seed)
    opt = make_optimizer(model, "AdamW8bit")
    train(model, opt, global_batch(seed)[:1])
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    save_trainer_checkpoint(str(tmp_path / "ckpt"), model, opt, step_lr, step=1)
    other = build_model(seed + 1)
    other_opt = make_optimizer(other, "AdamW8bit")
    train(other, other_opt, global_batch(seed + 1)[:2])
    before, opt_before = adapters(other), copy.deepcopy(other_opt.state_dict())
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda e: 1.0)  # another scheduler's state
    with pytest.raises(ValueError, match="scheduler state does not fit"):
        load_trainer_checkpoint(tmp_path / "ckpt", other, other_opt, lambda_lr)
    for name, value in adapters(other).items():
        assert torch.equal(value, before[name]), name
    after = other_opt.state_dict()
    for k, state in opt_before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after["state"][k][key]), (k, key)
    assert load_trainer_checkpoint(tmp_path / "ckpt", other, other_opt, step_lr)["step"] == 1


def test_sft_trainer_under_fsdp2_matches_ddp(tmp_path, seed):
    """SFTTrainer on an FSDP2-sharded QLoRA model (2 ranks, grad_accum 2) trains like the same
    trainer under DDP: same losses, same adapters."""
    from sft_fsdp_worker import sft_fsdp_worker

    mp.spawn(sft_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        torch.testing.assert_close(
            torch.tensor(r["fsdp"]["losses"]), torch.tensor(r["ddp"]["losses"]), rtol=1e-5, atol=1e-6
        )
        for name, value in r["ddp"]["adapters"].items():
            assert_adam_close(r["fsdp"]["adapters"][name], value, name)


def test_finetune_fsdp_command_under_torchrun(tmp_path, seed):
    """`qlora-fast finetune --nproc 2 --fsdp` (torchrun launched by the command) on a tiny Hugging
    Face Llama (q/o and the MLP split on 256-block units and are sharded; k/v do not and stay
    whole): exit 0, one report, and the gathered adapter, loaded in one process, gives the
    held-out perplexity the 2 ranks printed. With --checkpoint-every 2 it writes a sharded
    checkpoint at step 2; a second launch with --resume continues from it to the same adapter."""
    import re
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from helpers import corpus_hf_tokenizer

    from qlora_fast.data import PROMPT_TEMPLATE, load_instructions
    from qlora_fast.models.hf import load_hf_model
    from qlora_fast.peft import load_adapter
    from qlora_fast.train.sft import evaluate_loss

    fast = corpus_hf_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=fast.eos_token_id)
    model_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    cmd = [sys.executable, "-m", "qlora_fast.cli", "finetune", "--nproc", "2", "--fsdp", "--model", str(model_dir),
           "--steps", "3", "--batch-size", "2", "--lr", "2e-2", "--warmup-steps", "0", "--eval-pairs", "4",
           "--max-new-tokens", "2", "--seed", str(seed), "--output", str(tmp_path / "out"), "--no-progress",
           "--checkpoint-every", "2"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("=== qlora-fast finetune report ===") == 1, out  # rank 0 only
    assert "2 ranks; 5 of 7 4-bit layers sharded" in out, out  # q, o, gate, up, down; not k, v
    assert re.search(r"held-out exact match +\d+\.\d% -> \d+\.\d%", out), out
    after = float(re.search(r"held-out perplexity +[\d.]+ -> ([\d.]+)", out).group(1))

    adapter_dir = tmp_path / "out" / "adapter-qlora"
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    base, tokenizer = load_hf_model(str(model_dir), dtype=torch.float32, quantize="nf4")
    peft = load_adapter(base, str(adapter_dir))
    lora_b = [p for n, p in peft.adapter_parameters() if "lora_B" in n]
    assert len(lora_b) == 7 and all(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at 0)
    before = float(re.search(r"held-out perplexity +([\d.]+) ->", out).group(1))
    assert abs(before - after) > 1e-2 * after  # the training moved it, so the comparison below means something
    ppl = evaluate_loss(peft, tokenizer, load_instructions("heldout")[:4], PROMPT_TEMPLATE, 96)["perplexity"]
    assert ppl == pytest.approx(after, rel=2e-3, abs=2e-3)

    # the sharded checkpoint of step 2; --resume retrains step 3 from it: the same adapter, bit for bit
    written = sorted(f for f in os.listdir(tmp_path / "out") if not f.startswith("."))
    assert written == ["adapter-qlora", "checkpoint-2", "history.json"]
    from safetensors.torch import load_file

    first = load_file(adapter_dir / "adapter_model.safetensors")
    proc = subprocess.run(cmd + ["--resume"], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"held-out perplexity    {before:.3f} -> {after:.3f}" in proc.stdout, proc.stdout
    resumed = load_file(adapter_dir / "adapter_model.safetensors")
    assert resumed.keys() == first.keys() and all(torch.equal(resumed[k], v) for k, v in first.items())


def test_sft_trainer_fsdp2_checkpoint_resume(tmp_path, seed):
    """SFTTrainer on an FSDP2 model (2 ranks, paged 8-bit AdamW) writes sharded checkpoint folders;
    a fresh run resumed from the step-2 one repeats steps 3-4 bit-identically (losses, learning
    rates, adapters); a checkpoint of another run is refused on every rank."""
    from sft_fsdp_worker import sft_fsdp_resume_worker

    mp.spawn(sft_fsdp_resume_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        assert r["files"] == ["checkpoint-2", "checkpoint-4"]
        first, resumed = r["first"], r["resumed"]
        assert first["step"] == resumed["step"] == 4
        assert resumed["history"] == first["history"]  # steps 1-2 restored, 3-4 retrained: bit-identical
        assert first["history"][2]["loss"] != first["history"][1]["loss"]
        for name, value in first["adapters"].items():
            assert torch.equal(resumed["adapters"][name], value), name
        assert r["refused"] and "belongs to a different run" in r["refused"] and "adapters" in r["refused"]
    # one process (no FSDP2) loads the 2-rank trainer checkpoint: resharded, with a warning that the
    # per-rank data and RNG streams cannot continue bit-identically
    from sft_fsdp_worker import qlora_model

    from qlora_fast.distributed import load_trainer_checkpoint
    from qlora_fast.train.schedule import warmup_cosine_schedule
    from qlora_fast.train.sft import make_optimizer as sft_optimizer

    model = qlora_model(seed)
    opt = sft_optimizer("paged_adamw_8bit", [p for p in model.parameters() if p.requires_grad], 1e-2, 0.0)
    scheduler = warmup_cosine_schedule(opt, 1, 4)
    with pytest.warns(RuntimeWarning, match="written by 2 ranks, resumed on 1"):
        state = load_trainer_checkpoint(tmp_path / "run" / "checkpoint-2", model, opt, scheduler)
    assert state["step"] == 2 and scheduler.last_epoch == 2 and len(state["extra"]["history"]) == 2
    assert all(s["step"] == 2 for s in opt.state.values())


def test_grpo_trainer_under_fsdp2_matches_one_process(tmp_path, seed):
    """GRPOTrainer on an FSDP2-sharded QLoRA model, 2 ranks each sampling its half of the step's
    prompts (generation with the model unsharded, no per-token collective; KL to the reference,
    2 micro-batches), trains like one process on the same global batch: same rewards, losses to
    float tolerance, adapters as `assert_adam_close`. Samples are seeded per (step, prompt) in
    both runs (PromptSeededGRPO), since the trainer's own per-rank streams differ from one
    process's. Bad set-ups raise clear errors."""
    from grpo_fsdp_worker import grpo_model, run_grpo

    mp.spawn(grpo_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    history, adapters = run_grpo(grpo_model(seed))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert history[0]["reward_std"] > 0 and history[0]["skipped_groups"] < 4  # the groups carry signal
    for r in ranks:
        for mine, one in zip(r["history"], history):
            assert mine["reward"] == one["reward"] and mine["reward_std"] == pytest.approx(one["reward_std"], rel=1e-6)
            assert mine["completion_length"] == pytest.approx(one["completion_length"], rel=1e-6)
            assert mine["skipped_groups"] == one["skipped_groups"]
            assert mine["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
        assert r["adapters"].keys() == adapters.keys()
        for name, value in adapters.items():
            assert_adam_close(r["adapters"][name], value, name)
    loaded = grpo_model(seed)
    initial = dict(loaded.named_parameters())
    assert all(not torch.equal(v, initial[k]) for k, v in adapters.items())  # every adapter trained
    # the adapter saved under FSDP2 (gathered, written by rank 0) loads into one process as trained
    loaded.load_adapter(str(tmp_path / "adapter"))
    saved = dict(loaded.named_parameters())
    for name, value in ranks[0]["adapters"].items():
        assert torch.equal(saved[name], value), name
    prompts_error, save_error, stale_error, twice_error = ranks[0]["errors"]
    assert "not parameters of the model (built before shard_qlora_model?" in stale_error
    assert "already sharded with FSDP2" in twice_error
    assert prompts_error.startswith("ValueError")
    assert "prompts_per_step (3) must be a multiple of the world size (2)" in prompts_error
    assert save_error.startswith("NotImplementedError") and "checkpoint_every" in save_error
