"""Command-line arguments of ``train/train.py``, under LLaVA's and HF ``TrainingArguments``' names.

LLaVA scripts pass ``--flag True`` / ``--flag False`` for booleans; ``transformers.HfArgumentParser`` reads those
and the dataclass defaults below. Flags of HF's ``TrainingArguments`` that only concern its own Trainer
(``--lazy_preprocess``, ``--remove_unused_columns``, ``--evaluation_strategy``, ...) are accepted and ignored
where ignoring them is harmless; ``--fp16``/``--tf32`` map to what they mean here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "llava-hf / original LLaVA checkpoint, or a plain LM folder (then --vision_tower too)"},
    )
    version: str = field(default="v1", metadata={"help": "conversation template (LLaVA's --version): plain, v1, ..."})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only (stage 1)"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "LLaVA never trains the tower; False does"})
    freeze_mm_mlp_adapter: bool = field(default=False)
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP/SigLIP vision model folder"})
    mm_vision_select_layer: int = field(default=-2)
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch | cls_patch"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 mm_projector weights"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear | mlp2x_gelu | ..."})
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=False)
    mm_patch_merge_type: str = field(default="flat")
    attn_implementation: str = field(default="auto", metadata={"help": "fastllava attention backend (registry)"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON / JSONL (conversations or messages)"})
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str = field(default="square", metadata={"help": "square | pad | anyres"})
    is_multimodal: bool = field(default=True)
    lazy_preprocess: bool = field(default=True, metadata={"help": "always lazy here (accepted for LLaVA scripts)"})
    on_bad_sample: str = field(default="error", metadata={"help": "error (stop, list them) | skip (drop, count)"})


@dataclass
class TrainingArguments:
    output_dir: str = field(default="./checkpoints/run")
    # ---- packing
    packing: bool = field(default=False, metadata={"help": "pack samples into --packing_max_tokens micro-batches"})
    packing_max_tokens: int = field(default=4096, metadata={"help": "token budget per packed micro-batch"})
    packing_window: int = field(default=8192, metadata={"help": "samples packed together best-fit-decreasing"})
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "bfd: best-fit-decreasing (tightest; micro-batches of similar lengths) | shuffled: best fit in "
            "random order (random micro-batch composition; see fastllava.data.sampler)"
        },
    )
    model_max_length: int = field(default=2048, metadata={"help": "longest sample (tokens, image slots included)"})
    group_by_modality_length: bool = field(default=False)
    # ---- schedule
    num_train_epochs: float = field(default=1.0)
    max_steps: int = field(default=-1)
    per_device_train_batch_size: int = field(default=8, metadata={"help": "samples per micro-batch (unpacked)"})
    per_device_eval_batch_size: int = field(default=8)
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=2e-5)
    mm_projector_lr: float | None = field(default=None)
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0)
    lr_scheduler_type: str = field(default="cosine")
    warmup_ratio: float = field(default=0.0)
    warmup_steps: int = field(default=0)
    optim: str = field(default="adamw_torch")
    seed: int = field(default=42)
    data_seed: int | None = field(default=None)
    # ---- precision / memory / parallelism
    bf16: bool = field(default=False)
    fp16: bool = field(default=False)
    tf32: bool | None = field(default=None)
    gradient_checkpointing: bool = field(default=False)
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (train/configs/zero*.json)"})
    fsdp: str = field(default="", metadata={"help": "'full_shard' (FSDP2 fully_shard per decoder layer)"})
    ddp_backend: str | None = field(default=None, metadata={"help": "nccl | gloo (default: by device)"})
    no_cuda: bool = field(default=False)
    use_cpu: bool = field(default=False)
    # ---- LoRA / QLoRA
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none")
    bits: int = field(default=16, metadata={"help": "4: QLoRA on an NF4 base"})
    double_quant: bool = field(default=True)
    quant_type: str = field(default="nf4")
    # ---- loss
    loss_chunk_size: int = field(default=1024, metadata={"help": "rows per chunk of the fused linear CE"})
    loss_impl: str = field(default="auto", metadata={"help": "auto | chunked | liger | eager"})
    # ---- reliability
    on_nonfinite: str = field(default="skip", metadata={"help": "skip (drop the step, log) | stop"})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "stop after this many skipped steps in a row"})
    halt_after_step: int = field(default=-1, metadata={"help": "testing: exit abruptly after this step (crash)"})
    # ---- logging / saving
    logging_steps: float = field(default=1)
    logging_dir: str | None = field(default=None)
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb | all"})
    run_name: str | None = field(default=None)
    disable_tqdm: bool = field(default=False)
    save_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch"})
    save_steps: float = field(default=500)
    save_total_limit: int | None = field(default=None)
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or True: latest"})
    dataloader_num_workers: int = field(default=0)
    # ---- accepted for LLaVA scripts, no effect here
    evaluation_strategy: str = field(default="no")
    eval_strategy: str = field(default="no")
    remove_unused_columns: bool = field(default=False)
    cache_dir: str | None = field(default=None)
    mpt_attn_impl: str | None = field(default=None)
    local_rank: int = field(default=-1)
    overwrite_output_dir: bool = field(default=False)
    do_train: bool = field(default=True)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line into the three argument groups (LLaVA's split)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if train_args.on_nonfinite not in ("skip", "stop"):
        raise SystemExit(f"--on_nonfinite must be skip or stop, got {train_args.on_nonfinite!r}")
    if data_args.on_bad_sample not in ("error", "skip"):
        raise SystemExit(f"--on_bad_sample must be error or skip, got {data_args.on_bad_sample!r}")
    if train_args.bits not in (4, 8, 16):
        raise SystemExit(f"--bits must be 4, 8 or 16, got {train_args.bits}")
    if train_args.bits < 16 and not train_args.lora_enable:
        raise SystemExit("--bits 4/8 trains LoRA adapters on a quantized base: add --lora_enable True")
    if train_args.deepspeed and train_args.fsdp:
        raise SystemExit("--deepspeed and --fsdp are exclusive")
    return model_args, data_args, train_args
