"""What travels with a checkpoint's weights so it can be shared and used anywhere: its model card.

``README.md`` gives the license of the training data, the base model, the
metrics so far, the input format and a five-line example. The decoding
defaults travel in ``generation_config.json``, which save_pretrained writes
from the model's own (`models.set_decoding_defaults`).

`files_for` gives the card as text; checkpoint.py writes it with the rest.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from t5dialog import corpus_download, models, training_files
from t5dialog.checkpoint import RUN_CONFIG, checkpoint_name
from t5dialog.dialogues import SEPARATOR
from t5dialog.files import read_json

CARD = "README.md"


def files_for(run_config: dict, metrics: dict | None, step: int) -> dict[str, str]:
    """{file name: text} of what ``checkpoint-<step>`` carries beside what save_pretrained writes."""
    return {CARD: model_card(run_config, metrics, step)}


def training_data(train_file) -> dict:
    """What the model was trained on: card metadata and one line of prose.

    The DailyDialog corpus is recognised by the record data/download.py
    leaves beside it; anything else a user gave has a license we cannot know.
    """
    dailydialog = {"license": "cc-by-nc-sa-4.0", "datasets": ["roskoN/dailydialog"], "tags": ["dailydialog"],
                   "text": "DailyDialog (Li et al., IJCNLP 2017), fetched from the Hugging Face dataset roskoN/dailydialog. "
                           "Its license, CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike), carries over to this "
                           "model."}
    if not train_file:
        return {"license": "other", "license_name": "unknown", "text": "Unknown: the run did not record its training file."}
    path = Path(train_file).resolve()
    if path.parent == training_files.SAMPLE_DATA:
        return {"license": "other", "license_name": "project-demo-sample",
                "text": "the demo sample shipped with the code (data/sample): short dialogues written for the project, "
                        "free to use with its code. A demo, enough to see the pipeline work; not a useful chat model."}
    info = read_json(path.parent / corpus_download.MANIFEST)  # written beside a verified corpus
    if "roskoN/dailydialog" in str(info.get("source", "")):
        return dailydialog
    return {"license": "other", "license_name": "unknown",
            "text": f"`{train_file}` (given with --train-file); its license is unknown here: check it before sharing this model."}


def base_model(name) -> tuple[str | None, str]:
    """(hub id for the card's base_model or None, how the weights began in words)."""
    if not name:
        return None, "a seq2seq model trained"
    if name == "scratch":
        return None, "a small T5 trained from scratch (random initialisation, tokenizer trained on the training text)"
    if not Path(name).exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return name, f"[{name}](https://huggingface.co/{name}) fine-tuned"
    return None, f"a model from the local folder `{Path(name).name}` fine-tuned"


def _number(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _loss_row(label: str, loss) -> str:
    from t5dialog.metrics import perplexity  # here: its text metrics' imports cost train.py half a second at start

    if not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        return f"| {label} | n/a |"
    return f"| {label} | {loss:.4f} (perplexity {_number(perplexity(loss), 2)}) |"


def metrics_table(metrics: dict | None, step: int) -> str:
    metrics = dict(metrics or {})
    rows = ["| metric | value |", "|---|---|", f"| optimizer steps | {metrics.pop('step', step)} |"]
    rows.append(_loss_row("validation loss (this checkpoint)", metrics.pop("val_loss", None)))
    best, best_step = metrics.pop("best_val_loss", None), metrics.pop("best_step", None)
    rows.append(_loss_row("best validation loss" + (f" (step {best_step})" if best_step is not None else ""), best))
    rows += [f"| {name} | {_number(value)} |" for name, value in metrics.items()]
    return "\n".join(rows)


def decoding_summary() -> str:
    d = models.GENERATION_DEFAULTS
    how = "sampling" if d["do_sample"] else "greedy" if d["num_beams"] == 1 else f"beam search ({d['num_beams']} beams)"
    repeats = f", no repeated {d['no_repeat_ngram_size']}-grams" if d["no_repeat_ngram_size"] else ""
    return f"up to {d['max_new_tokens']} new tokens, {how}{repeats}"


def model_card(run_config: dict, metrics: dict | None, step: int) -> str:
    """README.md of a checkpoint: Hugging Face metadata, the input format, a runnable example, metrics so far."""
    data = training_data(run_config.get("train_file"))
    base, origin = base_model(run_config.get("model"))
    header = {"license": data["license"]}
    if "license_name" in data:
        header["license_name"] = data["license_name"]
    if base:
        header["base_model"] = base
    if "datasets" in data:
        header["datasets"] = data["datasets"]
    header |= {"tags": ["t5", "dialogue", *data.get("tags", [])], "library_name": "transformers",
               "pipeline_tag": "text2text-generation"}
    name = checkpoint_name(step)
    example = [
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        f'path = "{name}"  # this folder',
        "tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)",
        f'reply = model.generate(**tokenizer("{SEPARATOR}".join(["Hi , how are you ?", "Fine , thanks . And you ?"]), '
        'return_tensors="pt"))',
        "print(tokenizer.decode(reply[0], skip_special_tokens=True))",
    ]
    flags = ", ".join(f"{k} {run_config[k]}" for k in ("lr", "epochs", "max_steps", "max_length", "max_target_length", "seed")
                      if run_config.get(k) is not None)
    data_text = data["text"] + (" The base model's own license applies too." if base else "")
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {name}

A dialogue model: given a conversation so far, it writes the next turn. The weights are {origin}
for {step} optimizer steps.

Training data: {data_text}

## Input

The conversation so far, oldest turn first and newest last, turns joined by `{SEPARATOR}`, then `</s>`
(the tokenizer adds it): `Hi , how are you ?{SEPARATOR}Fine , thanks . And you ?</s>`. Punctuation stands apart
as in DailyDialog. Training inputs held at most {run_config.get("max_length", 512)} tokens: drop the oldest turns
of longer conversations. `generation_config.json` holds the decoding defaults ({decoding_summary()}),
so a plain `generate` answers as the project's infer.py does.

## Use

Run from the folder that holds this one, or set `path` to this folder's full path:

```python
{chr(10).join(example)}
```

## Metrics

{metrics_table(metrics, step)}

Training flags: {flags or "not recorded"} (all of them in `{RUN_CONFIG}`).
"""
