"""Train LLaVA on packed sequences: ``torchrun --nproc_per_node N train/train.py --packing True ...``.

LLaVA's arguments carry over (``--model_name_or_path --version --data_path --image_folder --vision_tower
--tune_mm_mlp_adapter --lora_enable --deepspeed --bf16 ...``, see ``train/args.py``); ``--packing True
--packing_max_tokens 4096`` packs samples best-fit-decreasing into micro-batches of at most that many tokens.

    # stage 1 (projector only) from a plain LM and a CLIP tower
    torchrun --nproc_per_node 8 train/train.py --model_name_or_path lmsys/vicuna-7b-v1.5-local \\
        --vision_tower clip-vit-large-patch14-336-local --version plain --tune_mm_mlp_adapter True \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images --packing True --bf16 True \\
        --output_dir checkpoints/stage1 --learning_rate 1e-3 --deepspeed train/configs/zero2.json

The loop, per optimizer step: take this rank's micro-batches of the global step (the sampler plans
``world_size * gradient_accumulation_steps`` of them), all-reduce their target count, and backpropagate each
micro-batch's *summed* CE divided by the global count -- so the step optimises the mean over every target token
of the global batch, whatever the packing or the split over ranks. Then sum gradients over ranks, clip, check
loss and grad norm are finite (skip or stop), step, log ``{'loss': ...}``, checkpoint atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # `torchrun train/train.py` puts train/ itself on sys.path: import our modules through the installed
    # `fastllava.train` package (or the checkout's root) instead.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from fastllava.data.dataset import SupervisedDataset, collate  # noqa: E402
from fastllava.data.sampler import MicroBatchSampler  # noqa: E402
from fastllava.train import checkpointing as ckpt  # noqa: E402
from fastllava.train import modeling, parallel  # noqa: E402
from fastllava.train.args import parse_args  # noqa: E402

log = logging.getLogger("fastllava.train")


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (HF's grouping); the projector at ``--mm_projector_lr``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        proj = modeling.is_projector_param(name) and args.mm_projector_lr is not None
        groups.setdefault((decay, proj), []).append(p)
    param_groups = [
        {
            "params": ps,
            "weight_decay": args.weight_decay if decay else 0.0,
            "lr": args.mm_projector_lr if proj else args.learning_rate,
        }
        for (decay, proj), ps in sorted(groups.items())
    ]
    if not param_groups:
        raise SystemExit("nothing to train: every parameter is frozen (check the freeze / tune flags)")
    return torch.optim.AdamW(
        param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def build_scheduler(optimizer, args, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """HF's schedules (``cosine``, ``linear``, ``constant``, ``constant_with_warmup``) with linear warmup, as
    ``transformers.get_scheduler`` computes them (without importing the Trainer stack)."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    kind = args.lr_scheduler_type
    if kind not in ("cosine", "linear", "constant", "constant_with_warmup"):
        raise SystemExit(f"--lr_scheduler_type {kind!r}: cosine | linear | constant | constant_with_warmup")

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Reporter:
    """``{'loss': ...}`` lines (HF Trainer's format), ``log_history.jsonl``, tensorboard / wandb."""

    def __init__(self, args, out_dir: Path, rank: int, run_config: dict) -> None:
        self.rank, self.out_dir = rank, out_dir
        targets = {"all": {"tensorboard", "wandb"}, "none": set()}.get(args.report_to, set(args.report_to.split(",")))
        self.tb = self.wandb = None
        if rank != 0:
            return
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("--report_to tensorboard needs tensorboard: pip install tensorboard") from exc
            self.tb = SummaryWriter(args.logging_dir or str(out_dir / "runs"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("--report_to wandb needs wandb: pip install wandb") from exc
            self.wandb = wandb.init(name=args.run_name, config=run_config)

    def log(self, record: dict, step: int, echo) -> None:
        if self.rank != 0:
            return
        echo(str({k: (round(v, 4) if isinstance(v, float) and k != "learning_rate" else v) for k, v in record.items()}))
        with open(self.out_dir / "log_history.jsonl", "a") as f:
            f.write(json.dumps({**record, "step": step}) + "\n")
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(out_dir: Path) -> None:
    """``loss_curve.png`` from ``log_history.jsonl`` (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no loss_curve.png (pip install matplotlib)")
        return
    path = out_dir / "log_history.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_args, data_args, args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not (args.no_cuda or args.use_cpu)
    device_type = "cuda" if use_cuda else "cpu"
    rank, world, local_rank = parallel.init_distributed(args.ddp_backend, device_type)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.tf32 and use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ model
    tokenizer, model, processor = modeling.build_model(model_args, data_args, args)
    modeling.configure_trainable(model, model_args, args)
    parallel.swap_lm_head(model, args.loss_chunk_size, args.loss_impl)
    model.to(device)
    module = parallel.TrainModule(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    if rank == 0:
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))

    # ------------------------------------------------------------------ data
    budget = args.packing_max_tokens if args.packing else args.model_max_length
    ds = SupervisedDataset(
        data_args.data_path,
        tokenizer,
        model.config,
        image_folder=data_args.image_folder,
        image_processor=processor,
        template=model_args.version,
        max_tokens=min(budget, args.model_max_length),
        on_bad_sample=data_args.on_bad_sample,
        image_aspect_ratio=data_args.image_aspect_ratio,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
    )
    if rank == 0:
        log.info("data: %s", ds.report.summary())
    per_step = world * args.gradient_accumulation_steps
    sampler = MicroBatchSampler(
        ds.lengths,
        ds.is_multimodal,
        ds.indices,
        micro_batches_per_step=per_step,
        token_budget=args.packing_max_tokens if args.packing else None,
        batch_size=args.per_device_train_batch_size,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        group_by_modality=args.group_by_modality_length or args.packing,
        window=args.packing_window,
        strategy=args.packing_strategy,
    )
    steps_in_epoch = [sampler.steps_per_epoch(0)]
    if steps_in_epoch[0] == 0:
        raise SystemExit(f"not one full optimizer step of data: {per_step} micro-batches needed per step")
    if args.max_steps > 0:
        total_steps = args.max_steps
    else:
        n_epochs = math.ceil(args.num_train_epochs)
        steps_in_epoch = [sampler.steps_per_epoch(e) for e in range(n_epochs)]
        frac = args.num_train_epochs - (n_epochs - 1)
        total_steps = sum(steps_in_epoch[:-1]) + math.ceil(frac * steps_in_epoch[-1])
    pad_to = None if args.packing else "longest"

    # ------------------------------------------------------------------ optimizer, engine, resume
    if args.fsdp:  # before the optimizer: fully_shard replaces the parameters by sharded ones
        module = parallel.apply_fsdp2(module, args.bf16)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, total_steps)
    engine = None
    if args.deepspeed:
        engine = parallel.init_deepspeed(
            module,
            optimizer,
            scheduler,
            parallel.deepspeed_config(args.deepspeed, args, world, model.config.text.hidden_size),
        )
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "log_history": [], "nonfinite_skipped": 0}
    resume = ckpt.resolve_resume(out_dir, args.resume_from_checkpoint)
    if resume is not None:
        loaded = ckpt.load_checkpoint(resume, rank)
        missing = [n for n, _ in trainable if n not in loaded["trainable"]]
        if missing:
            raise SystemExit(f"{resume} lacks trainable weights {missing[:4]}: was it written by another setup?")
        parallel.load_train_state(model, module, optimizer, engine, bool(args.fsdp), loaded)
        scheduler.load_state_dict(loaded["scheduler"])
        state = loaded["trainer_state"]
        ckpt.set_rng_state(loaded["rank_state"]["rng"])
        if rank == 0:
            log.info("resumed from %s at step %d", resume, state["global_step"])
        with open(out_dir / "log_history.jsonl", "w") as f:  # the log as it was at the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in state["log_history"])

    reporter = Reporter(args, out_dir, rank, modeling.run_args_dict(model_args, data_args, args))
    save_every = int(args.save_steps) if args.save_steps >= 1 else max(1, int(args.save_steps * total_steps))
    log_every = int(args.logging_steps) if args.logging_steps >= 1 else max(1, int(args.logging_steps * total_steps))
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16 and engine is None and not args.fsdp)
    params = [p for _, p in trainable]

    def save(step: int) -> None:
        sd = parallel.full_trainable_state(model, module, engine, bool(args.fsdp))
        opt_sd, rank_extra = parallel.optimizer_state(optimizer, module, engine, bool(args.fsdp))
        ckpt.save_checkpoint(
            out_dir, step, sd, opt_sd, scheduler.state_dict(), state, rank, args.save_total_limit, rank_extra
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=state["global_step"], disable=args.disable_tqdm or rank != 0, dynamic_ncols=True
    )
    window_losses: list[float] = []
    window_tokens, window_t0 = 0, time.perf_counter()
    module.train()

    # ------------------------------------------------------------------ the loop
    while state["global_step"] < total_steps:
        epoch = state["epoch"]
        plan = [mbs[rank::world] for _, mbs in sampler.steps(epoch, state["step_in_epoch"])]
        mine = [mb for step_mbs in plan for mb in step_mbs]
        loader = torch.utils.data.DataLoader(
            mine,
            batch_size=None,
            shuffle=False,
            num_workers=args.dataloader_num_workers,
            collate_fn=lambda mb: collate(
                [ds[i] for i in mb],
                model.config,
                pad_to=max(ds.lengths[i] for i in mb) if pad_to else None,
                pad_id=tokenizer.pad_token_id or 0,
            ),
        )
        it = iter(loader)
        for _ in plan:
            batches = [next(it) for _ in range(args.gradient_accumulation_steps)]
            local = torch.tensor([sum(b.n_targets for b in batches if b is not None)], dtype=torch.float64)
            n_global = float(parallel.all_reduce_sum(local)[0])
            loss_sum = torch.zeros((), dtype=torch.float64)
            scale = 1.0 / max(n_global, 1.0)
            if engine is not None or args.fsdp:
                scale *= world  # engines average gradients over ranks; we want the sum
            for b in batches:
                if b is None or b.n_targets == 0:
                    continue
                packed = b.packed.to(device)
                with autocast:
                    s = module(packed, b.target_rows.to(device), b.targets.to(device))
                loss_sum += s.detach().double().cpu()
                if engine is not None:
                    engine.backward(s * scale * args.gradient_accumulation_steps)
                    engine.step()
                else:
                    (s * scale).backward()
                window_tokens += b.n_tokens
            if engine is None and not args.fsdp:
                parallel.all_reduce_grads(params)
            loss = float(parallel.all_reduce_sum(loss_sum)) / max(n_global, 1.0)
            if engine is None:
                grad_norm = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            else:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                if engine is None:
                    optimizer.step()
                    scheduler.step()
                state["nonfinite_in_a_row"] = 0
            else:
                state["nonfinite_skipped"] = state.get("nonfinite_skipped", 0) + 1
                state["nonfinite_in_a_row"] = state.get("nonfinite_in_a_row", 0) + 1
                msg = f"step {state['global_step'] + 1}: non-finite loss {loss} / grad norm {grad_norm}"
                if args.on_nonfinite == "stop" or state["nonfinite_in_a_row"] >= args.max_nonfinite_steps:
                    save(state["global_step"])
                    raise SystemExit(msg + " -- stopping (state saved)")
                log.warning(
                    msg + (" -- step skipped (--on_nonfinite skip)" if engine is None else parallel.ENGINE_SKIP)
                )
            if engine is None:
                optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            bar.update(1)
            if finite:
                window_losses.append(loss)
            if state["global_step"] % log_every == 0 or state["global_step"] == total_steps:
                dt = time.perf_counter() - window_t0
                tokens = float(parallel.all_reduce_sum(torch.tensor([float(window_tokens)]))[0])
                record = {
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "grad_norm": grad_norm,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": round(
                        epoch + state["step_in_epoch"] / max(steps_in_epoch[min(epoch, len(steps_in_epoch) - 1)], 1), 4
                    ),
                    "tokens_per_s": round(tokens / max(dt, 1e-9), 1),
                }
                state["log_history"].append({**record, "step": state["global_step"]})
                reporter.log(record, state["global_step"], bar.write)
                window_losses, window_tokens, window_t0 = [], 0, time.perf_counter()
            if args.save_strategy == "steps" and state["global_step"] % save_every == 0:
                save(state["global_step"])
            if state["global_step"] == args.halt_after_step:
                bar.write(f"halting after step {state['global_step']} (--halt_after_step)")
                sys.stdout.flush()
                os._exit(3)
            if state["global_step"] >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if args.save_strategy == "epoch":
                save(state["global_step"])
    bar.close()

    # ------------------------------------------------------------------ outputs
    if args.fsdp or parallel.is_zero3(engine):  # unshard: rank 0 gets the full weights as plain parameters
        full = parallel.consolidated_state_dict(module, engine, bool(args.fsdp))
        if rank == 0:
            parallel.materialize(model, full)
    if rank == 0:
        model.to("cpu").float()
        run_args = modeling.run_args_dict(model_args, data_args, args)
        if args.lora_enable:
            modeling.save_lora_adapter(model, out_dir / "adapter", run_args)
            modeling.merged_model(model)
        if model_args.tune_mm_mlp_adapter:
            modeling.save_projector(model, out_dir / "mm_projector.safetensors")
        modeling.save_final(model, out_dir, tokenizer, processor)
        (out_dir / "training_args.json").write_text(json.dumps(run_args, indent=2, default=str))
        (out_dir / "data_report.json").write_text(
            json.dumps({"bad": ds.report.counts, "runtime_bad": dict(ds.runtime_bad), **{"n_total": ds.report.n_total}})
        )
        plot_loss_curve(out_dir)
        log.info("saved %s", out_dir)
    reporter.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
