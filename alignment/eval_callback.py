"""The `eval:` section in the Trainer-based stages (SFT, reward models): a transformers TrainerCallback
that drives an `alignment.evaluators.EvalRunner`.

    on_train_begin  step 0, when `eval.on_start` (not after a resume)
    on_step_end     the evaluators due at this step; at the last step (state.max_steps) all of them
    on_log          the Trainer's training log → the user callbacks' `on_step_end`
    on_save         a checkpoint-N directory → `on_save`

An evaluation record goes to evals.jsonl and the callbacks' `on_evaluate` (EvalRunner.run) and into
the Trainer's log as `eval_<name>/<metric>`, next to `eval_loss`: so it reaches every `report_to`
tracker, and transformers' TensorBoard writer files it under the same tag the GRPO stage uses,
`eval/<name>/<metric>`. The record is logged through `transformers.Trainer.log` itself, because TRL's
trainers override `log` to flush their accumulated training metrics into whatever is logged.

Evaluators run on the main process while the others wait at their next collective; under DeepSpeed
ZeRO-3 every process runs them (each forward gathers parameters from all processes) and only the main
process writes.
"""

from __future__ import annotations

import os

from transformers import Trainer, TrainerCallback

from alignment.evaluators import EvalRunner


def trainer_key(key: str) -> str:
    """`eval/<name>/<metric>` (EvalRunner) → `eval_<name>/<metric>` (the Trainer's eval naming)."""
    return "eval_" + key.removeprefix("eval/")


class EvalTrainerCallback(TrainerCallback):
    def __init__(self, runner: EvalRunner, trainer: Trainer):
        self.runner = runner
        self.trainer = trainer
        self.final_metrics: dict[str, float] = {}
        """The last-step evaluation in Trainer naming (empty until it ran)."""

    def _evaluate(self, state, model, tokenizer, final: bool) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        main = state.is_world_process_zero
        if not (main or is_deepspeed_zero3_enabled()):
            return
        was_training = model.training
        try:
            record = self.runner.run(model, tokenizer, state.global_step, final=final, write=main)
        finally:
            model.train(was_training)
        logs = {trainer_key(k): v for k, v in record.items()}
        if main and logs:
            # Logging clears control.should_log, which on_step_end may just have set for the step's own
            # training log: keep it.
            should_log = self.trainer.control.should_log
            Trainer.log(self.trainer, dict(logs))
            self.trainer.control.should_log = should_log
        if final:
            self.final_metrics = logs

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step == 0 and self.runner.due(0):
            self._evaluate(state, model, processing_class, final=False)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        final = state.global_step >= state.max_steps
        if self.runner.due(state.global_step, final):
            self._evaluate(state, model, processing_class, final=final)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:  # a training record, not eval / summary
            self.runner.step_end(state.global_step, dict(logs))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.runner.saved(state.global_step, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
