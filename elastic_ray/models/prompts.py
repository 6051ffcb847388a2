"""Turn an instruction into the model's prompt text, image placeholder included."""

LLAVA_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"


def build_prompt(processor, instruction: str) -> str:
    """The processor's chat template when it has one, else the LLaVA-1.5 conversation format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return LLAVA_FORMAT.format(prompt=instruction)
