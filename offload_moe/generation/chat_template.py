"""Where a checkpoint keeps its chat template, found in the order transformers' tokenizer uses.

1. `chat_template.jinja` (the default template) and `additional_chat_templates/NAME.jinja` (named
   ones): what `save_pretrained` writes today (Qwen3, gpt-oss and other current repos). When any of
   these files exists, tokenizer_config.json's template is ignored, as transformers does.
2. `tokenizer_config.json`'s `chat_template`: a string, or a list of {"name", "template"}.
3. `chat_template.json` ({"chat_template": "..."}), the legacy processor file: used only when neither
   of the above has a template (transformers' tokenizer does not read it; its processors do).

Of named templates the one called "default" is used, as `apply_chat_template` does without `tools`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import OffloadMoeError, read_user_file

JINJA_FILE, TEMPLATE_DIR, LEGACY_FILE = "chat_template.jinja", "additional_chat_templates", "chat_template.json"


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None          # the template to render; None: the checkpoint has none
    source: str               # the file it came from (or that was looked at), for messages
    names: tuple[str, ...] = ("default",)


def find_chat_template(directory: str | Path, tokenizer_config: dict) -> ChatTemplate:
    directory = Path(directory)
    templates: dict[str, str] = {}
    jinja = directory / JINJA_FILE
    if jinja.is_file():
        templates["default"] = read_user_file(jinja, "chat template")
    named_dir = directory / TEMPLATE_DIR
    if named_dir.is_dir():
        for file in sorted(named_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = read_user_file(file, "chat template")
    if templates:
        source = jinja if "default" in templates else named_dir
        return _pick(templates, str(source))
    config_source = str(directory / "tokenizer_config.json")
    value = tokenizer_config.get("chat_template")
    if isinstance(value, str) and value:
        return ChatTemplate(value, config_source)
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()) or len(named) != len(value):
            raise OffloadMoeError(f"{config_source}: chat_template: expected a string or a list of "
                                  "{'name': str, 'template': str}")
        return _pick(named, config_source)
    if value is not None and not isinstance(value, str):
        raise OffloadMoeError(f"{config_source}: chat_template: expected a string or a list of "
                              "{'name': str, 'template': str}, got " + type(value).__name__)
    legacy = directory / LEGACY_FILE
    if legacy.is_file():
        try:
            raw = json.loads(read_user_file(legacy, "chat template"))
        except json.JSONDecodeError as e:
            raise OffloadMoeError(f"{legacy}: not valid JSON ({e})") from None
        text = raw.get("chat_template") if isinstance(raw, dict) else None
        if not isinstance(text, str):
            raise OffloadMoeError(f"{legacy}: expected {{\"chat_template\": \"...\"}}")
        return ChatTemplate(text, str(legacy))
    return ChatTemplate(None, config_source if (directory / "tokenizer_config.json").exists() else str(directory))


def _pick(templates: dict[str, str], source: str) -> ChatTemplate:
    return ChatTemplate(templates.get("default"), source, tuple(sorted(templates)))


def no_template_message(template: ChatTemplate) -> str:
    """Why chat is not available: no template at all, or named ones of which none is the default."""
    if template.names != ("default",):
        return (f"{template.source}: named chat templates {', '.join(template.names)} and none called "
                "'default', so offload-moe cannot tell which to use for chat (use a plain prompt)")
    return f"{template.source}: no chat_template, so chat is not available for this checkpoint (use a plain prompt)"
