"""Fine-tune a base model on converted examples: TrainConfig -> trl SFTTrainer (QLoRA) -> runs/<id>/adapter/.

The heavy-import boundary: every module in this package imports torch, transformers, trl and peft at
the top, and no light module (config, messages, runs, formats, dataset, jobs, the page) imports this
package. The app starts training in a child process (tuner.jobs runs `python -m tuner train`).

    recipe.py       TrainConfig -> LoRA, precision, quantization, attention, batching, SFTConfig
    data.py         the examples as the trainer sees them (tokenized, checked, the evaluation sample)
    trainer.py      build_trainer(): data + model + SFTConfig + callbacks; the context training runs in
    callbacks.py    RunRecorder (metrics, status, divergence), OverheadBudget (evaluation/checkpoint time)
    checkpoints.py  resuming
    result.py       save, reload-check, model card
    run.py          train_run(): setup, train, save; a failure becomes the run's status
    cli.py          `python -m tuner train`
"""

from tuner.train.recipe import precision, quantization
from tuner.train.run import train_run
from tuner.train.trainer import build_trainer, length_grouped_batches, training_context

__all__ = ["build_trainer", "length_grouped_batches", "precision", "quantization", "train_run", "training_context"]
