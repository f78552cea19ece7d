# Training defaults shared by every config (detrex layout). Any field can be overridden on the
# command line, e.g. `train.max_iter=1000 train.output_dir=./output/run1 train.device=cpu`.
train = dict(
    # empty: ./output/<detector>/<folder>/<config name>, from the config file's path
    # (tprd.engine.main.default_output_dir)
    output_dir="",
    # weights loaded into the model before training unless --resume finds a checkpoint in
    # output_dir (a partial load is reported; docs/workflow.md "The detrex workflow"); --eval-only loads strictly.
    # A detrex checkpoint of a plain detector is converted on load
    init_checkpoint="",
    # fine-tuning from a detector of another class count: leave the class heads (class_embed,
    # DINO's label_enc) as initialised instead of refusing their shape mismatch
    init_skip_class_heads=False,
    # distillation only: without train.init_checkpoint the teacher would be random, which is refused
    # unless this is True (the synthetic smoke configs; every run then warns that the teacher is random)
    allow_random_teacher=False,
    max_iter=90000,
    # mixed precision: dtype "float16" (with a GradScaler) or "bfloat16"
    amp=dict(enabled=False, dtype="float16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="cuda",
    seed=1,
    cudnn_benchmark=False,
    # CPU training on Linux: fix glibc's mmap threshold at this many bytes (e.g. 4194304), so blocks
    # of that size or more go back to the system when freed instead of fragmenting the heap: a lower
    # peak RSS for more system time (measured in benchmarks/msda_steps.md); None: glibc's default
    cpu_mmap_threshold=None,
    # CPU tensor memory: "auto" = when train.device is cpu, large blocks (>= 1 MiB) are cached and
    # reused from step to step (tprd/utils/cpu_allocator.py: lower peak RSS, no page re-zeroing;
    # measured in benchmarks/msda_steps.md); "caching" = also on GPU runs; "default" = torch's own
    cpu_allocator="auto",
    # global L2 norm of all gradients clipped to max_norm (docs/methods.md#schedules)
    clip_grad=dict(enabled=True, params=dict(max_norm=0.1, norm_type=2)),
    # exponential moving average of the weights (tprd/engine/ema.py); evaluations then also report
    # ema/bbox/...; --eval-only uses the average with use_ema_weights_for_eval_only=True
    model_ema=dict(enabled=False, decay=0.999, use_ema_weights_for_eval_only=False),
)
