"""Training chat templates: the model's own template plus `{% generation %}` markers.

trl computes the assistant-only loss mask from `{% generation %}` / `{% endgeneration %}` in the
chat template. SmolLM2's ChatML template has none, so trl refuses `assistant_only_loss=True`.
We patch ChatML-style templates ourselves (keeping their default system prompt, so training and
chat render the same text) and fall back to trl's table of known templates.
"""

from __future__ import annotations

from tuner.errors import ModelError

# The per-message line of ChatML templates such as SmolLM2's and Qwen2's.
CHATML_TURN = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
# An assistant turn trains on its content and end-of-turn token; weight 0 (OpenAI format) skips it.
CHATML_TRAINING_TURN = (
    "{%- if message['role'] == 'assistant' and (message['weight'] is not defined or message['weight'] is none"
    " or message['weight'] != 0) -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}" + CHATML_TURN + "{%- endif -%}"
)


def training_template(tokenizer) -> str:
    """A chat template with generation markers that renders exactly like `tokenizer`'s own.

    >>> # tokenizer.apply_chat_template(msgs, chat_template=training_template(tokenizer),
    >>> #     return_assistant_tokens_mask=True, return_dict=True)["assistant_masks"]
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    if not template:
        raise ModelError("The model has no chat template; pick an instruct/chat model.")
    if has_generation_markers(template):
        return template
    for turn in (CHATML_TURN, CHATML_TURN.replace("\\n", "\n")):  # escaped or literal newlines
        if turn in template:
            return template.replace(turn, CHATML_TRAINING_TURN)
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError as exc:
        raise ModelError(
            "This model's chat template has no {% generation %} markers and tuner does not know how to add "
            "them, so the loss cannot be limited to the assistant's replies. Fix: pick a ChatML, Llama 3, "
            "Qwen, Gemma or Phi chat model, or set `assistant_only_loss: false` in the run config."
        ) from exc
    return patched or template
