"""FSDP2 worker for tests/test_fsdp.py (spawned; imports only torch and qlora_fast)."""
import os

import torch

from qlora_fast.models import LlamaConfig, LlamaForCausalLM
from qlora_fast.peft import LoraConfig, get_peft_model

CONFIG = dict(vocab_size=64, hidden_size=256, intermediate_size=320, num_layers=2, num_heads=4, num_kv_heads=2,
              max_seq_len=32)
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 12, 3, 1e-2


def build_model(seed, double_quant=True, hf=False):
    """The same QLoRA model (NF4 base, adapters on every projection) for any rank, from `seed`:
    the built-in Llama, or (hf=True) a transformers Llama of the same shape built from a config."""
    torch.manual_seed(seed)
    if hf:
        import transformers

        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=CONFIG["vocab_size"],
                hidden_size=CONFIG["hidden_size"],
                intermediate_size=CONFIG["intermediate_size"],
                num_hidden_layers=CONFIG["num_layers"],
                num_attention_heads=CONFIG["num_heads"],
                num_key_value_heads=CONFIG["num_kv_heads"],
                max_position_embeddings=CONFIG["max_seq_len"],
            )
        )
    else:
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    lora = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      r=4, lora_alpha=8, quantize_base="nf4", double_quant=double_quant)
    model = get_peft_model(model, lora)
    with torch.no_grad():  # non-zero B so the first step already moves every adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def global_batch(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, CONFIG["vocab_size"], (STEPS, GLOBAL_BATCH, SEQ), generator=g)


def adapters(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("_fsdp_wrapped_module.", "")] = p.detach().clone()
    return out


def make_optimizer(model, name="torch.AdamW"):
    """torch's AdamW, or a qlora_fast.optim class by name (e.g. "PagedAdamW"; 8-bit ones keep
    8-bit states for every adapter)."""
    import qlora_fast.optim

    cls = torch.optim.AdamW if name == "torch.AdamW" else getattr(qlora_fast.optim, name)
    kwargs = {"min_8bit_size": 0} if name.endswith("8bit") else {}
    return cls([p for p in model.parameters() if p.requires_grad], lr=LR, **kwargs)


def optimizer_states(model, opt):
    """This rank's flat optimizer states (qlora_fast optimizers) by adapter name."""
    return {name.replace("_fsdp_wrapped_module.", ""): opt._flat_state(opt.state[p])
            for name, p in model.named_parameters() if p.requires_grad}


def train(model, opt, batches, on_step=None):
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(on_step(loss) if on_step else loss.item())
    return losses


def fsdp_worker(rank, world_size, init_file, out_dir, seed, double_quant, optimizer, hf):
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    from qlora_fast.distributed import four_bit_bytes, prepare_4bit_for_fsdp, shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = build_model(seed, double_quant, hf)
        full_4bit = four_bit_bytes(prepare_4bit_for_fsdp(model))
        shard_qlora_model(model)
        local_4bit = four_bit_bytes(model)
        # What FSDP2 all-gathers in one forward+backward, counted at its collective.
        gathered, call = [], DefaultAllGather.__call__

        def counting(self, output_tensor, input_tensor, group, async_op=False):
            gathered.append(output_tensor.numel() * output_tensor.element_size())
            return call(self, output_tensor, input_tensor, group, async_op)

        per = GLOBAL_BATCH // world_size
        batches = global_batch(seed)[:, rank * per:(rank + 1) * per]

        def mean_loss(loss):
            total = loss.detach().clone()
            dist.all_reduce(total)
            return total.item() / world_size

        opt = make_optimizer(model, optimizer)
        DefaultAllGather.__call__ = counting
        try:
            losses = train(model, opt, batches[:1], mean_loss)
        finally:
            DefaultAllGather.__call__ = call
        losses += train(model, opt, batches[1:], mean_loss)
        # between forward and backward no layer keeps its gathered 4-bit bytes (autograd holds
        # views of FSDP2's unsharded storage, which is freed after the forward)
        ids = batches[0]
        out = model(input_ids=ids, labels=ids).loss
        held = [fp._unsharded_param.untyped_storage().size()
                for layer in model.modules() if type(layer).__name__.endswith("DecoderLayer")
                for fp in layer._get_fsdp_state()._fsdp_param_group.fsdp_params
                if fp._param_fqn.endswith("units") and hasattr(fp, "_unsharded_param")]
        out.backward()
        # the padded unsharded bytes of every parameter FSDP2 manages (what one unshard moves)
        unsharded = {}
        for name, p in model.named_parameters():
            rows = -(-p.shape[0] // world_size) * world_size
            unsharded[name.replace("_fsdp_wrapped_module.", "")] = rows * (p.numel() // p.shape[0]) * p.element_size()
        # elements whose optimizer states this rank keeps (qlora_fast's paged optimizers: its shards only)
        trainable = [p for p in model.parameters() if p.requires_grad]
        state_elems = sum(pg.end - pg.start for p in trainable for pg in opt.state[p].get("pages", []))
        local_elems = sum(p.to_local().numel() for p in trainable)
        mp_losses = None
        if optimizer != "torch.AdamW":  # the same run with bf16 compute for the adapters (FSDP2 mixed precision)
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_model = shard_qlora_model(build_model(seed, double_quant, hf), mp_policy=MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
            mp_losses = train(mp_model, make_optimizer(mp_model, optimizer), batches, mean_loss)
        result = dict(
            losses=losses,
            mp_losses=mp_losses,
            state_elems=state_elems,
            local_elems=local_elems,
            adapters=adapters(model),
            full_4bit=full_4bit,
            local_4bit=local_4bit,
            gathered=gathered,
            held_after_forward=held,
            unsharded=unsharded,
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def build_moe_model(seed):
    """A tiny transformers Mixtral, QLoRA (its fused experts as Experts4bit, adapters on the rest)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=CONFIG["vocab_size"])
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, quantize_base="nf4"))
    with torch.no_grad():  # non-zero B so the first step already moves every adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def moe_fsdp_worker(rank, world_size, init_file, out_dir, seed):
    """QLoRA steps on the 4-bit Mixtral under FSDP2 (the experts' packed bytes sharded as any
    parameter; layers too small to split on block boundaries replicated)."""
    import torch.distributed as dist

    from qlora_fast.distributed import shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = shard_qlora_model(build_moe_model(seed), unsplittable="replicate")
        sharded = [n for n, p in model.named_parameters() if ".experts." in n and type(p).__name__ == "DTensor"]
        per = GLOBAL_BATCH // world_size

        def mean_loss(loss):
            total = loss.detach().clone()
            dist.all_reduce(total)
            return total.item() / world_size

        losses = train(model, make_optimizer(model), global_batch(seed)[:, rank * per:(rank + 1) * per], mean_loss)
        torch.save(dict(losses=losses, sharded=sharded, adapters=adapters(model)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def perturb_adapters(model, seed):
    """Different adapter values (same base): a load must overwrite them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(torch.randn(local.shape, generator=g))


def dcp_worker(rank, world_size, init_file, out_dir, seed):
    """Train 1 step, save a DCP checkpoint, train on; then a fresh model and optimizer load the
    checkpoint and train the same steps: the continuations must be bit-identical."""
    import torch.distributed as dist

    from qlora_fast.distributed import load_adapter_checkpoint, save_adapter_checkpoint, shard_qlora_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        per = GLOBAL_BATCH // world_size
        batches = global_batch(seed)[:, rank * per:(rank + 1) * per]
        ckpt = os.path.join(out_dir, "ckpt")

        def run(load, optimizer="torch.AdamW", ckpt=ckpt):
            model = shard_qlora_model(build_model(seed))
            opt = make_optimizer(model, optimizer)
            if load:
                perturb_adapters(model, seed + 7)
                extra = load_adapter_checkpoint(model, opt, ckpt)
                rng = extra.pop("rng")  # the trainer state comes back with the checkpoint
                assert torch.equal(rng, torch.arange(3)) and extra == {"step": 1, "history": [{"loss": 1.5}]}, extra
            else:
                train(model, opt, batches[:1])
                save_adapter_checkpoint(model, opt, ckpt, extra={"step": 1, "history": [{"loss": 1.5}],
                                                                 "rng": torch.arange(3)})
            at_ckpt = adapters(model)
            states = optimizer_states(model, opt) if optimizer != "torch.AdamW" else None
            losses = train(model, opt, batches[1:])
            return at_ckpt, losses, adapters(model), states

        first, second = run(False), run(True)
        paged_ckpt = os.path.join(out_dir, "paged")
        paged = (run(False, "PagedAdamW", paged_ckpt), run(True, "PagedAdamW", paged_ckpt))
        # 8-bit states (paged, every adapter 8-bit): codes sharded like the adapters, absmax per rank
        eight_ckpt = os.path.join(out_dir, "eight")
        eight = (run(False, "PagedAdamW8bit", eight_ckpt), run(True, "PagedAdamW8bit", eight_ckpt))
        torch.save(dict(first=first, second=second, paged=paged, eight=eight), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
