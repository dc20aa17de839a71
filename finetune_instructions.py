"""Instruction fine-tune a base model on the book's chapter 7 data, keeping the best epoch.

    python finetune_instructions.py --checkpoint runs/rtx3090 --run-dir runs/rtx3090-instruct
    python finetune_instructions.py --checkpoint gpt2 --run-dir runs/gpt2-instruct
    python finetune_instructions.py --checkpoint gpt2 --run-dir runs/gpt2-instruct --resume latest
    python evaluate.py instruct --run-dir runs/gpt2-instruct --out out/gpt2-answers.jsonl
    python evaluate.py judge out/rtx3090-answers.jsonl out/gpt2-answers.jsonl --model gpt-5.1

The book's settings (instructions.py), --epochs as a maximum with the best epoch kept, and early
stopping are described in docs/judge.md. The run folder is train.py's; a checkpoint is written after
every epoch and when the run is stopped (Ctrl-C, SIGTERM, --max-steps), and --resume latest continues
exactly, because the shuffle of epoch e depends only on (--seed, e) and dropout on (--seed, step).
"""

import argparse
import os

import torch
from tqdm import tqdm

import checkpointing as ckpt
import cli
import gpt
import huggingface
import instructions
import training
from files import write_json_atomic

# --- the defaults: the book's chapter 7 -------------------------------------------------------------
DATA = None                 # None: the book's instruction-data.json, downloaded on first use
EPOCHS = 10                 # the most epochs; Giles Thomas's best were 2 (OpenAI's GPT-2 small) to 10 (his model)
PATIENCE = 2                # stop after this many epochs in a row without a new lowest validation loss
BATCH_SIZE = 8              # the book's
LR = 5e-5                   # the book's AdamW settings for fine-tuning
WEIGHT_DECAY = 0.1
MASK_PROMPT = False         # the book trains on the prompt too; exercise 7.2 masks it out of the loss
MAX_LENGTH = 1024           # the book's allowed_max_length, capped at the model's context length
DROP_RATE = None            # None: the base model's own dropout
PRECISION = "fp16"          # fp16 autocast + GradScaler + TF32 on CUDA (as train.py); fp32 elsewhere
LOGS_PER_EPOCH = 5          # train-loss points per epoch on the chart (validation: once per epoch)
WHICH = "best"              # which checkpoint of a base run folder
SEED = 123                  # the book's torch.manual_seed(123): shuffle order and dropout
DEVICE = "auto"             # CUDA, then MPS, then the CPU


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--checkpoint",
                   help=f"the base model: a checkpoint folder, a run folder (--which picks its checkpoint) or one of "
                        f"{', '.join(huggingface.HF_GPT2_MODELS)}")
    p.add_argument("--which", default=WHICH, help="in a base run folder: best, latest or step-NNNNNNNN")
    p.add_argument("--run-dir", required=True, help="where config, metrics, chart and checkpoints go")
    p.add_argument("--data", default=DATA, help="instruction data in the book's format: a JSON list of {instruction, "
                                                f"input, output}} (default: the book's file, kept in {instructions.BOOK_DATA_PATH})")
    p.add_argument("--epochs", type=cli.positive_int, default=EPOCHS, help="the most epochs to train")
    p.add_argument("--patience", type=cli.positive_int, default=PATIENCE,
                   help="stop after this many epochs in a row without a new lowest validation loss")
    p.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE, help="examples per step")
    p.add_argument("--lr", type=cli.positive_float, default=LR, help="AdamW's learning rate")
    p.add_argument("--weight-decay", type=cli.non_negative_float, default=WEIGHT_DECAY, help="AdamW's weight decay")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=MASK_PROMPT,
                   help="leave the prompt's tokens out of the loss (the book's exercise 7.2)")
    p.add_argument("--max-length", type=cli.positive_int, default=MAX_LENGTH,
                   help="cut examples to this many tokens (and to the model's context length)")
    p.add_argument("--drop-rate", type=cli.fraction, default=DROP_RATE, help="dropout (default: the base model's)")
    p.add_argument("--precision", choices=training.PRECISIONS, default=PRECISION,
                   help="fp16 = autocast + GradScaler (CUDA); off CUDA fp16 and tf32 run in fp32")
    p.add_argument("--max-steps", type=cli.positive_int, help="stop (and save) after this optimizer step")
    p.add_argument("--resume", choices=["latest", "best"],
                   help="continue the run in --run-dir, with its own settings (config.json): no other flag needed")
    p.add_argument("--allow-setting-change", action="store_true",
                   help="on --resume, take a changed setting that alters the fine-tune (lr, batch size, --seed, dropout, "
                        "precision ...); config.json records it. Without it such a change is refused")
    p.add_argument("--seed", type=int, default=SEED, help="random seed of the shuffle order and dropout")
    p.add_argument("--device", default=DEVICE, help="auto, cpu, cuda, cuda:N or mps")
    return p


# A resume refuses a typed change to these unless --allow-setting-change; the others (--epochs,
# --patience, --max-steps, --device) are taken and said.
MATH_SETTINGS = ("checkpoint", "which", "data", "batch_size", "lr", "weight_decay", "mask_prompt", "max_length",
                 "drop_rate", "precision", "seed")


def parse_args(argv=None):
    """As train.py's: on --resume the run's own arguments (RUN/config.json) are the defaults."""
    parser, args = cli.parse_resumable(build_parser, argv, MATH_SETTINGS)
    if args.checkpoint is None:
        parser.error("--checkpoint is required (a --resume of a run folder takes it from the run's config.json)")
    for setting, (old, new) in args.setting_changes.items():
        print(f"note: --{setting.replace('_', '-')} {new} (the run had {old})")
    return args


def main(argv=None):
    args = parse_args(argv)
    # The first Ctrl-C or SIGTERM saves and exits 0 (training.StopSignals); a second Ctrl-C ends here, unsaved.
    unsaved = (f"stopped at once by the second one, without saving; the checkpoints in {args.run_dir} are "
               "intact: continue with --resume latest")
    with cli.errors_end_in_one_line(instructions.InstructionError, ckpt.CheckpointError, huggingface.HubError,
                                    gpt.DeviceError, stopped=lambda: unsaved), \
            ckpt.run_folder_lock(args.run_dir), training.StopSignals() as signals:
        finetune(args, argv, signals)


def start_point(args, data_sha256, device):
    """(model, base model's name, checkpoint folder or None, its meta, state): resume after checking the
    checkpoint is this run's, or start from the base model. None when a resumed run is done."""
    if args.resume:
        folder, meta = ckpt.find_resume_checkpoint(args.run_dir, args.resume)
        if meta.get("data_sha256") != data_sha256:
            raise ckpt.CheckpointError(f"--data is not the instruction data {folder} was fine-tuned on (sha256 "
                                       "differs); resume with the same file, or start a new --run-dir")
        state = training.RunState.from_checkpoint(meta)
        if state.stopped_early or state.epoch >= args.epochs:
            why = "stopped early" if state.stopped_early else f"trained its {state.epoch} epoch(s); raise --epochs to go on"
            print(f"{args.run_dir} {why} (best: epoch {state.best_epoch}, val loss {state.best_val_loss:.4f}); "
                  "nothing to do")
            return None
        ckpt.set_aside_newer_checkpoints(args.run_dir, state.step)
        return ckpt.load_model(folder, device)[0], meta["training"]["base_model"], folder, meta, state
    ckpt.refuse_to_overwrite(args.run_dir)
    model, base = huggingface.load_any(args.checkpoint, args.which, device)
    if args.drop_rate is not None:
        model.set_dropout(args.drop_rate)
    return model, base, None, None, training.RunState()


def finetune(args, argv, signals):
    device = gpt.resolve_device(args.device)
    examples, data_path, data_sha256 = instructions.load_examples(args.data)
    splits = instructions.split_examples(examples, data_path)
    if len(splits["train"]) < args.batch_size:
        raise instructions.InstructionError(f"the train split of {data_path} has {len(splits['train'])} examples, "
                                            f"fewer than one batch of {args.batch_size}; lower --batch-size")
    try:
        precision = training.Precision(args.precision, device).apply()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    start = start_point(args, data_sha256, device)
    if start is None:
        return
    model, base, folder, meta, state = start
    tokenizer = gpt.get_tokenizer()
    if model.cfg["vocab_size"] < tokenizer.n_vocab:
        raise SystemExit(f"error: the model's vocabulary has {model.cfg['vocab_size']} tokens, fewer than GPT-2's "
                         f"{tokenizer.n_vocab}; fine-tune a model trained on GPT-2 tokens")
    max_length = min(args.max_length, model.cfg["context_length"])
    encoded = {name: [instructions.encode_example(e, tokenizer) for e in part] for name, part in splits.items()}
    steps_per_epoch = len(encoded["train"]) // args.batch_size  # the book drops the last partial batch
    # The book's optimizer, as chapter 7 builds it; no clipping, one micro-batch a step.
    optimizers = [torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)]
    train_step = training.TrainStep(model, optimizers, precision, 1, 0.0, args.seed, False)
    if folder is not None:
        ckpt.restore_training_state(folder, meta, optimizers, train_step.scaler)
        print(f"resuming from {folder}: epoch {state.epoch + 1}, batch {state.batch_in_epoch} of {steps_per_epoch}")
    settings = {**{k: v for k, v in vars(args).items() if k not in ("run_dir", "resume", "setting_changes")},
                "base_model": base, "data": os.path.abspath(data_path), "precision": precision.name,
                "device": str(device), "max_length": max_length, "steps_per_epoch": steps_per_epoch,
                "split": {name: len(part) for name, part in splits.items()}}
    ckpt.remove_unfinished_writes(args.run_dir)
    write_json_atomic(os.path.join(args.run_dir, cli.CONFIG_FILE), {
        "model_config": model.cfg, "finetune": settings, "data_sha256": data_sha256,
        "arguments": cli.run_arguments(args), "setting_changes": args.setting_changes,
        "command": cli.command_line("finetune_instructions.py", argv)})
    print(f"fine-tuning {base} ({gpt.count_parameters(model):,} parameters) on {data_path}: "
          + ", ".join(f"{len(part)} {name}" for name, part in splits.items())
          + f"; {steps_per_epoch} steps of {args.batch_size} an epoch, at most {args.epochs} epochs; "
          f"{precision.name} on {device}")
    train_epochs(args, model, encoded, state, train_step, settings, data_sha256, signals)


def save(run_dir, state, model, train_step, settings, data_sha256, val_loss=None):
    """A full checkpoint after state.step steps (ckpt.save_run_checkpoint); `best` moves when val_loss is
    the lowest yet; older epochs keep their weights, not their optimizer state."""
    ckpt.save_run_checkpoint(run_dir, state.step, model, {
        "step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
        "next_sequence": state.next_sequence, "val_loss": val_loss,
        "best_val_loss": state.best_val_loss, "best_step": state.best_step, "elapsed_s": state.elapsed_s,
        "data_sha256": data_sha256, "training": settings, "metrics": state.metrics,
    }, ckpt.training_state(train_step.optimizers, train_step.scaler, state.progress()),
        improved=val_loss is not None and state.best_step == state.step, keep_last=1, keep_weights=None,
        best_step=state.best_step, metrics=state.metrics)
    import plot_losses  # matplotlib: loaded when first drawing
    plot_losses.update_run_chart(run_dir, x="epochs")


def train_epochs(args, model, encoded, state, train_step, settings, data_sha256, signals):
    """The loop: epochs of shuffled batches, a chart point LOGS_PER_EPOCH times an epoch, validation and a
    checkpoint at each epoch's end, early stopping, and a clean stop on a signal or --max-steps."""
    device, max_length = train_step.precision.device, settings["max_length"]
    steps_per_epoch = settings["steps_per_epoch"]
    log_every = max(1, steps_per_epoch // LOGS_PER_EPOCH)
    validate = lambda: instructions.examples_loss(model, encoded["val"], args.batch_size, args.mask_prompt,
                                                  max_length, device)
    stopping = lambda: signals.received or (args.max_steps is not None and state.step >= args.max_steps)
    if not state.metrics:
        state.metrics.append({"step": 0, "epoch": 0.0, "tokens_seen": 0, "train_loss": None, "val_loss": validate(),
                              "elapsed_s": 0.0})
        print(f"epoch 0: val loss {state.metrics[-1]['val_loss']:.4f} (the base model)")
    state.start_clock()
    # The step losses since the last read stay on the device (no GPU sync per step).
    since_read, nonfinite = torch.zeros((), device=device), torch.zeros((), device=device)
    with tqdm(total=args.epochs * steps_per_epoch, initial=state.step, desc="fine-tune", unit="step",
              dynamic_ncols=True) as bar:
        while state.epoch < args.epochs:
            order = torch.randperm(len(encoded["train"]), generator=torch.Generator().manual_seed(args.seed + state.epoch))
            model.train()
            while state.batch_in_epoch < steps_per_epoch:
                start = state.batch_in_epoch * args.batch_size
                batch = [encoded["train"][i] for i in order[start:start + args.batch_size].tolist()]
                inputs, targets = instructions.collate(batch, args.mask_prompt, max_length)
                state.tokens_seen += int((targets != instructions.IGNORE_INDEX).sum())  # counted on the CPU
                loss, _ = train_step([(state.step, inputs.to(device), targets.to(device))])
                since_read.add_(torch.where(torch.isfinite(loss), loss, 0.0))
                nonfinite.add_((~torch.isfinite(loss)).float())
                state.step += 1
                state.batch_in_epoch += 1
                state.train_loss_steps += 1
                bar.update(1)
                chart = state.batch_in_epoch % log_every == 0 or state.batch_in_epoch == steps_per_epoch
                stop = stopping()
                if chart or stop:
                    if nonfinite.item() and not train_step.precision.use_scaler:  # the weights are spoiled
                        raise SystemExit(f"error: the loss was not finite before step {state.step}; stopped "
                                         "without saving. Try a lower --lr")
                    bar.set_postfix(loss=f"{since_read.item() / max(1, state.train_loss_steps):.3f}",
                                    epoch=state.epoch + 1, refresh=False)
                    state.train_loss_sum += since_read.item()
                    since_read.zero_()
                    nonfinite.zero_()
                    state.tick()
                if chart:
                    state.metrics.append(chart_point(state, steps_per_epoch))
                if stop and state.batch_in_epoch < steps_per_epoch:
                    signals.saving = True
                    save(args.run_dir, state, model, train_step, settings, data_sha256)
                    print(f"{signals.received or '--max-steps'}: saved step {state.step} (epoch {state.epoch + 1}, "
                          f"batch {state.batch_in_epoch} of {steps_per_epoch}); continue with --resume latest")
                    return
            if end_epoch(args, state, model, train_step, settings, data_sha256, signals, validate()):
                break
            if stopping():
                print(f"{signals.received or '--max-steps'}: saved epoch {state.epoch}; continue with --resume latest")
                return
    print(f"done: best epoch {state.best_epoch}, val loss {state.best_val_loss:.4f}; the fine-tuned model is "
          f"{os.path.join(args.run_dir, ckpt.CHECKPOINTS, 'best')}. Next: python evaluate.py instruct "
          f"--run-dir {args.run_dir} --out ANSWERS.jsonl")


def chart_point(state, steps_per_epoch):
    """A metrics row: the mean train loss since the previous one (val_loss is added at an epoch's end)."""
    row = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / steps_per_epoch,
           "tokens_seen": state.tokens_seen, "train_loss": state.train_loss_sum / max(1, state.train_loss_steps),
           "val_loss": None, "elapsed_s": state.elapsed_s}
    state.train_loss_sum, state.train_loss_steps = 0.0, 0
    return row


def end_epoch(args, state, model, train_step, settings, data_sha256, signals, val_loss):
    """After an epoch's validation: best moved when it is the lowest yet, a checkpoint, and whether
    PATIENCE epochs in a row have passed without a new best (then the run stops early)."""
    state.metrics[-1]["val_loss"] = val_loss
    state.tick()
    state.epoch += 1
    state.batch_in_epoch = 0
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.best_step = val_loss, state.epoch, state.step
    state.stopped_early = state.epoch - state.best_epoch >= args.patience
    signals.saving = True
    save(args.run_dir, state, model, train_step, settings, data_sha256, val_loss)
    signals.saving = False
    tqdm.write(f"epoch {state.epoch}: train loss {state.metrics[-1]['train_loss']:.4f}, val loss {val_loss:.4f}"
               f"{' (best)' if state.best_epoch == state.epoch else ''}")
    if state.stopped_early:
        tqdm.write(f"stopping early: no lower validation loss in the {args.patience} epoch(s) after epoch "
                   f"{state.best_epoch}")
    return state.stopped_early


if __name__ == "__main__":
    main()
