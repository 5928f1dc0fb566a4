"""``chat_template``: the chat template written into the merged model's tokenizer files.

A recipe's ``chat_template`` is one of:

- ``auto``: the template most of the referenced models' tokenizers carry (compared after
  stripping surrounding whitespace; the first seen wins a tie), or none when no model has one;
- a built-in name (:data:`BUILTIN`): alpaca, chatml, llama3, mistral, exaone — modelalloy's
  renderings of those published formats;
- a Jinja template, literally (at least 20 characters, with a ``{``).

The template goes into ``tokenizer_config.json`` (``chat_template``) and ``chat_template.jinja``,
which transformers reads. Without a tokenizer in the output there is nothing to write it to.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from modelalloy.errors import CheckpointError

BUILTIN = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
               "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{% if messages[0]['role'] == 'system' %}"
                "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
                "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
                "{% for message in turns %}{% if message['role'] == 'user' %}"
                "{{ ' [INST] ' + (system + '\\n\\n' if system is defined and loop.first "
                "else '') + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}"
                "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}"
               "{{ message['content'] | trim + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}"
               "{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
               "{% elif message['role'] == 'user_context' %}"
               "{{ '### Input:\\n' + message['content'] | trim + '\\n\\n' }}"
               "{% elif message['role'] == 'assistant' %}"
               "{{ '### Response:\\n' + message['content'] | trim + '\\n\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
               "'assistant' %}{{ '### Response:\\n' }}{% endif %}"),
    "exaone": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
               "{{ '[|' + message['role'] + '|]' + message['content'] }}"
               "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}"
               "{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


def is_valid_setting(setting: str) -> bool:
    """``auto``, a built-in name, or something that looks like a Jinja template."""
    return setting == "auto" or setting in BUILTIN or (len(setting) >= 20 and "{" in setting)


def read_template(folder: Path) -> str | None:
    """The chat template of the tokenizer in ``folder`` (``chat_template.jinja``, else the
    ``chat_template`` of tokenizer_config.json; of a list of named ones, ``default``)."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = Path(folder) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def choose_template(setting: str, model_folders: list[Path]) -> str | None:
    """The template text for a recipe's ``chat_template`` setting (None: nothing to write)."""
    if setting == "auto":
        found = [t.strip() for t in (read_template(f) for f in model_folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN.get(setting, setting)


def write_template(folder: Path, template: str) -> bool:
    """Put ``template`` into the tokenizer files of ``folder``; False without a tokenizer."""
    config_path = Path(folder) / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: invalid tokenizer config ({e})") from None
    config["chat_template"] = template
    tmp = config_path.with_name(".tokenizer_config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)
    (Path(folder) / "chat_template.jinja").write_text(template, encoding="utf-8")
    return True
