"""The shared entry point of ``tools/train_net.py`` and ``projects/<detector>/train_net.py``.

::

    python projects/deformable_detr/train_net.py --config-file CFG.py [--num-gpus N] \
        [--resume | --eval-only] [path.key=value ...]

``main(args)`` runs in every process: load the config, apply the overrides, set up the run, then
either evaluate (``--eval-only``: weights from ``train.init_checkpoint``, or the newest checkpoint
of ``train.output_dir`` with ``--resume``; output into a fresh ``eval_<checkpoint name>`` folder
next to the checkpoint unless ``train.output_dir`` is on the command line, see
:func:`eval_only_output_dir`) or train (``do_train``). ``run()`` parses the command line
and starts ``main`` through :func:`tprd.engine.launch.launch`.

Config fields read (detrex layout): ``model``, ``optimizer`` (its ``params.model`` is set to the
model), ``lr_multiplier``, ``dataloader.train`` / ``dataloader.test`` / ``dataloader.evaluator`` and
``train.*`` (output_dir, init_checkpoint, max_iter, amp, ddp, checkpointer, eval_period,
log_period, device, seed, clip_grad, model_ema).
"""
from __future__ import annotations

import logging
import os
from collections import abc
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from tprd.config import LazyConfig, instantiate, select_value
from tprd.data.loader import skip_train_batches
from tprd.errors import MissingEntryError, UserError

from . import comm, hooks
from .checkpoint import DetectionCheckpointer, remove_leftover_temporary_files
from .defaults import default_argument_parser, default_setup, save_run_config, user_errors_exit
from .ema import EMAHook, ModelEMA
from .events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from .launch import launch
from .setup_checks import _device, check_init_file, check_num_classes  # noqa: F401 (re-exported)
from .lr_scheduler import LRMultiplier
from .trainer import AMPTrainer, SimpleTrainer, create_ddp_model

__all__ = [
    "main",
    "run",
    "do_train",
    "do_test",
    "build_model",
    "check_num_classes",
    "print_csv_format",
    "default_output_dir",
    "load_config",
    "eval_only_output_dir",
]

logger = logging.getLogger("tprd.engine")


_get = select_value  # one dotted config entry, or a default


def default_output_dir(config_file: str) -> str:
    """Where a run of ``config_file`` writes when neither the config nor the command line sets
    ``train.output_dir``: ``./output/<detector>/<folder>/<config name>`` for a config at
    ``projects/<detector>/<...>/<folder>/<config name>.py`` (``train_distill.sh`` derives the same,
    e.g. ``./output/dino/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep``), else
    ``./output/<config name>``."""
    path = os.path.abspath(config_file)
    name = os.path.splitext(os.path.basename(path))[0]
    parts = path.split(os.sep)
    if "projects" in parts:
        i = len(parts) - 1 - parts[::-1].index("projects")
        if len(parts) - i >= 4:  # projects/<detector>/.../<folder>/<name>.py
            return "./" + "/".join(["output", parts[i + 1], parts[-2], name])
    return f"./output/{name}"


def load_config(config_file: str, opts: Optional[Sequence[str]] = None):
    """The config with the command-line overrides applied; an empty ``train.output_dir`` becomes
    :func:`default_output_dir` of the file."""
    if not config_file:
        raise UserError("--config-file is required (e.g. projects/deformable_detr/configs/deformable_detr_r18_synthetic.py).")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file {config_file!r} does not exist (relative paths are taken from {os.getcwd()}).")
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(opts or []))
    if "train" in cfg and not _get(cfg, "train.output_dir", ""):
        cfg.train.output_dir = default_output_dir(config_file)
    return cfg


# --------------------------------------------------------------------------------------------
# Model, checks, evaluation
# --------------------------------------------------------------------------------------------
def build_model(cfg) -> torch.nn.Module:
    """Instantiate ``cfg.model`` on ``train.device``."""
    device = _device(cfg)  # fail before building anything when the device is unavailable
    model = instantiate(cfg.model)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Model: {type(model).__name__} with {n_params:,} parameters ({n_train:,} trainable)")
    logger.debug(f"Model:\n{model}")
    return model


def print_csv_format(results: Mapping[str, Any]) -> None:
    """Log ``{"bbox": {"AP": ..}}`` as copy-pasteable ``copypaste:`` lines."""
    for task, res in results.items():
        if isinstance(res, abc.Mapping):
            keys = [k for k, v in res.items() if isinstance(v, (int, float))]
            logger.info(f"copypaste: Task: {task}")
            logger.info("copypaste: " + ",".join(keys))
            logger.info("copypaste: " + ",".join(f"{float(res[k]):.4f}" for k in keys))
        else:
            logger.info(f"copypaste: {task}={res}")


def do_test(cfg, model, ema: Optional[ModelEMA] = None) -> Dict[str, Any]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``.

    With ``ema`` the averaged weights are evaluated too and reported under ``ema/`` (``ema/bbox``).
    """
    if _get(cfg, "dataloader.evaluator") is None or _get(cfg, "dataloader.test") is None:
        logger.warning("No dataloader.test / dataloader.evaluator in the config: skipping evaluation.")
        return {}
    from tprd.evaluation import inference_on_dataset

    def evaluate() -> Dict[str, Any]:
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
        if comm.is_main_process() and results:
            print_csv_format(results)
        return dict(results or {})

    results = evaluate()
    if ema is not None:
        logger.info("Evaluating the EMA weights")
        with ema.applied():
            results.update({f"ema/{task}": res for task, res in evaluate().items()})
    return results


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _clip_params(cfg) -> Optional[Dict[str, Any]]:
    clip = _get(cfg, "train.clip_grad")
    if not clip or not clip.get("enabled", False):
        return None
    params = dict(clip.get("params") or {})
    params.setdefault("max_norm", 0.1)
    params.setdefault("norm_type", 2)
    return {"max_norm": float(params["max_norm"]), "norm_type": float(params["norm_type"])}


def _amp_dtype(cfg) -> torch.dtype:
    name = str(_get(cfg, "train.amp.dtype", "float16")).replace("torch.", "")
    table = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"train.amp.dtype must be float16 or bfloat16, got {name!r}.")
    return table[name]


def _build_ema(cfg, model) -> Optional[ModelEMA]:
    ema_cfg = _get(cfg, "train.model_ema", {}) or {}
    if not ema_cfg.get("enabled", False):
        return None
    decay = float(ema_cfg.get("decay", 0.999))
    warmups = int(ema_cfg.get("warmups", 0) or 0)
    logger.info(f"Model EMA enabled (decay {decay}, warmups {warmups}): evaluations also report ema/bbox/...")
    return ModelEMA(model, decay=decay, warmups=warmups)


def do_train(args, cfg) -> Dict[str, Any]:
    """Build model, optimizer, data, schedule and hooks from ``cfg`` and train.

    Returns the last evaluation results (main process; {} elsewhere or without evaluation).
    """
    check_num_classes(cfg, "train")
    max_iter = int(cfg.train.max_iter)

    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # The optimizer config keeps the model object; drop it so the config stays printable.
    cfg.optimizer.params.model = None
    train_loader = instantiate(cfg.dataloader.train)
    ema = _build_ema(cfg, model)

    ddp_cfg = dict(_get(cfg, "train.ddp", {}) or {})
    model = create_ddp_model(
        model,
        broadcast_buffers=bool(ddp_cfg.get("broadcast_buffers", False)),
        find_unused_parameters=bool(ddp_cfg.get("find_unused_parameters", False)),
        fp16_compression=bool(ddp_cfg.get("fp16_compression", False)),
    )
    clip = _clip_params(cfg)
    if _get(cfg, "train.amp.enabled", False):
        trainer = AMPTrainer(model, train_loader, optimizer, clip, dtype=_amp_dtype(cfg))
        scaler = trainer.grad_scaler
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer, clip)
        scaler = None

    scheduler = LRMultiplier(optimizer, multiplier=instantiate(cfg.lr_multiplier), max_iter=max_iter)
    output_dir = str(_get(cfg, "train.output_dir", "./output"))
    seeds = hooks.IterationSeeds(_get(cfg, "train.seed", -1))  # restored on --resume (checkpointable)
    checkpointer = DetectionCheckpointer(
        model, output_dir, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema, rng=seeds
    )
    if comm.is_main_process():
        for path in remove_leftover_temporary_files(output_dir):
            logger.info(f"Removed {path}: the temporary file of a checkpoint write that was killed")
    # load before the writers open metrics.json: a refused checkpoint leaves no partial result
    resume = bool(getattr(args, "resume", False))
    resuming = resume and checkpointer.has_checkpoint()
    extra = checkpointer.resume_or_load(
        str(_get(cfg, "train.init_checkpoint", "") or ""), resume=resume, config_file=args.config_file,
        skip_class_heads=bool(_get(cfg, "train.init_skip_class_heads", False)),
    )

    save_run_config(cfg)  # model, data and weights are built and checked: the run's config.yaml
    eval_hook = hooks.EvalHook(int(_get(cfg, "train.eval_period", 0) or 0), lambda: do_test(cfg, model, ema))
    ckpt_cfg = _get(cfg, "train.checkpointer", {}) or {}
    log_period = int(_get(cfg, "train.log_period", 20) or 20)
    main_hooks = [
        seeds,  # first: every step's random state follows from (seed, rank, iteration)
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler),
        EMAHook(ema) if ema is not None else None,  # before the checkpointer and the evaluation
        hooks.PeriodicCheckpointer(
            checkpointer,
            period=int(ckpt_cfg.get("period", 5000)),
            max_to_keep=ckpt_cfg.get("max_to_keep", None),
        )
        if comm.is_main_process()
        else None,
        eval_hook,
        hooks.PeriodicWriter(
            [
                CommonMetricPrinter(max_iter),
                JSONWriter(os.path.join(output_dir, "metrics.json")),
                TensorboardXWriter(output_dir),
            ],
            period=log_period,
        )
        if comm.is_main_process()
        else None,
        hooks.ProgressBar(),  # draws on the main process's terminal only
    ]
    trainer.register_hooks(main_hooks)

    start_iter = int(extra.get("iteration", -1)) + 1 if resuming else 0
    if ema is not None and not ema.loaded:
        ema.reset()  # the average starts at the loaded (or initial) weights
    if resuming and start_iter >= max_iter:
        logger.info(f"The run in {output_dir} has finished already (iteration {start_iter} of {max_iter}): "
                    "nothing to train; evaluating its final weights.")
    elif resuming:
        logger.info(f"Resumed at iteration {start_iter} of {max_iter}")
        # continue the data stream where the interrupted run stopped (same seed => same batches)
        if skip_train_batches(train_loader, start_iter):
            logger.info(f"Data stream continues at batch {start_iter}")
    trainer.train(start_iter, max_iter)
    return dict(eval_hook.last_results or {})


def _on_command_line(opts: Optional[Sequence[str]], key: str) -> bool:
    return any(str(o).split("=", 1)[0].lstrip("+") == key for o in (opts or []))


def _fresh_folder(base: str) -> str:
    """``base``, or ``base-2``, ``base-3`` ... : the first that does not exist or is empty; created."""
    candidate, n = base, 1
    while os.path.isdir(candidate) and os.listdir(candidate) or os.path.isfile(candidate):
        n += 1
        candidate = f"{base}-{n}"
    os.makedirs(candidate, exist_ok=True)
    return candidate


def eval_only_output_dir(cfg, args) -> str:
    """The folder an ``--eval-only`` run writes into (log, config, the evaluator's results).

    ``train.output_dir`` when it is given on the command line; otherwise a fresh folder next to
    the evaluated checkpoint, ``<checkpoint dir>/eval_<checkpoint name>`` (``-2``, ``-3`` ... when
    an earlier evaluation is there), so no evaluation overwrites another or a training run's
    results. The evaluated checkpoint is the one :meth:`DetectionCheckpointer.resume_or_load`
    picks: the last checkpoint of ``train.output_dir`` with ``--resume``, else
    ``train.init_checkpoint`` (none: ``<train.output_dir>/eval_random_init``). Decided on the main
    process and shared with the others.
    """
    configured = str(_get(cfg, "train.output_dir", "") or "")
    if _on_command_line(args.opts, "train.output_dir") and configured:
        return configured
    folder = None
    if comm.is_main_process():
        checkpoint = str(_get(cfg, "train.init_checkpoint", "") or "")
        if args.resume and configured:
            checkpoint = DetectionCheckpointer(torch.nn.Module(), configured).get_checkpoint_file() or checkpoint
        name = "eval_" + os.path.splitext(os.path.basename(checkpoint.rstrip("/")))[0] if checkpoint else "eval_random_init"
        local = checkpoint and "://" not in checkpoint
        parent = os.path.dirname(os.path.abspath(checkpoint)) if local else (configured or "./output")
        folder = _fresh_folder(os.path.join(parent, name))
    return comm.all_gather(folder)[0]


def main(args) -> Any:
    """Per-process entry: config, set-up checks, setup, then ``--eval-only`` evaluation or training.

    The checks that can fail on the user's files and values (device, init file, a resumed run's
    config, the distillation set-up, datasets, class counts: :func:`tprd.engine.setup_checks.check_setup`)
    run before the output folder, ``log.txt`` or ``config.yaml`` are written; ``config.yaml`` is
    written once the model, the data and the weights are built too.
    """
    from tprd.data import DatasetCatalog

    from .setup_checks import check_setup

    cfg = load_config(args.config_file, args.opts)
    try:
        notes = check_setup(cfg, args)
    except BaseException:
        DatasetCatalog.clear_preloaded()
        raise
    checkpoint_dir = str(_get(cfg, "train.output_dir", "") or "")  # where --resume finds checkpoints
    fresh = bool(checkpoint_dir) and not os.path.exists(checkpoint_dir)
    if args.eval_only:
        given = _on_command_line(args.opts, "train.output_dir") and bool(checkpoint_dir)
        fresh = not (given and os.path.exists(checkpoint_dir))  # else a new folder of this evaluation
        cfg.train.output_dir = eval_only_output_dir(cfg, args)
    default_setup(cfg, args, save_config=False)
    for note in notes:
        logger.warning(note)
    try:
        if args.eval_only:
            results = _eval_only(cfg, args, checkpoint_dir)
            logger.info(f"--eval-only: results written to {cfg.train.output_dir}")
            return results
        return do_train(args, cfg)
    except Exception as e:
        if fresh:
            _remove_if_only_log(str(cfg.train.output_dir), e)
        raise
    finally:
        DatasetCatalog.clear_preloaded()


def _remove_if_only_log(folder: str, error: BaseException) -> None:
    """A run that made its output folder and stopped on a user error while building (model, weights,
    loaders), before writing anything but its log, leaves no folder behind."""
    from .defaults import find_user_error

    if not comm.is_main_process() or find_user_error(error) is None or not os.path.isdir(folder):
        return
    if set(os.listdir(folder)) <= {"log.txt"}:
        for name in ("tprd", "fvcore"):
            for handler in list(logging.getLogger(name).handlers):
                if getattr(handler, "_tprd_handler", False) and isinstance(handler, logging.FileHandler):
                    logging.getLogger(name).removeHandler(handler)
                    handler.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _eval_only(cfg, args, checkpoint_dir: str) -> Dict[str, Any]:
    """Evaluate the checkpoint of ``train.init_checkpoint`` (or, with ``--resume``, the last one of
    ``checkpoint_dir``), optionally its EMA weights."""
    check_num_classes(cfg, "test")
    model = build_model(cfg)
    model = create_ddp_model(model, broadcast_buffers=False)
    ema_cfg = _get(cfg, "train.model_ema", {}) or {}
    use_ema = bool(ema_cfg.get("enabled", False) and ema_cfg.get("use_ema_weights_for_eval_only", False))
    ema = ModelEMA(model) if use_ema else None
    checkpointer = DetectionCheckpointer(model, checkpoint_dir, ema=ema)
    init = str(_get(cfg, "train.init_checkpoint", "") or "")
    if not init and not (args.resume and checkpointer.has_checkpoint()):
        logger.warning("--eval-only without train.init_checkpoint: evaluating randomly initialised weights.")
    extra = checkpointer.resume_or_load(init, resume=args.resume, strict=True, config_file=args.config_file)
    save_run_config(cfg)
    if ema is None:
        return do_test(cfg, model)
    if "ema" in extra:  # train.init_checkpoint: only the model was loaded by the checkpointer
        ema.load_state_dict(extra["ema"])
    if not ema.loaded:
        raise MissingEntryError(
            f"train.model_ema.use_ema_weights_for_eval_only=True but the checkpoint "
            f"({init or 'last checkpoint'}) has no 'ema' entry: it was trained without "
            "train.model_ema.enabled=True; evaluate its weights without the flag"
        )
    logger.info("Evaluating the checkpoint's EMA weights")
    with ema.applied():
        return do_test(cfg, model)


def run(argv: Optional[Sequence[str]] = None) -> Any:
    """Parse the command line (``sys.argv`` by default) and launch :func:`main`."""
    args = default_argument_parser().parse_args(argv)
    if getattr(args, "debug", False):
        from tprd.errors import DEBUG_ENV

        previous = os.environ.get(DEBUG_ENV)
        os.environ[DEBUG_ENV] = "1"  # also seen by spawned workers
        try:
            return _run(args)
        finally:
            if previous is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = previous
    return _run(args)


def _run(args) -> Any:
    print("Command Line Args:", args, flush=True)
    with user_errors_exit():
        if args.num_gpus * args.num_machines > 1:
            # the set-up checks (config, overrides, init file, datasets ...) here once: an error is one
            # message, not one traceback per spawned worker
            from tprd.data import DatasetCatalog

            from .setup_checks import check_setup

            try:
                check_setup(load_config(args.config_file, args.opts), args)
            finally:
                DatasetCatalog.clear_preloaded()  # each worker loads its own
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
