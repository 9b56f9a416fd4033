"""The exported model's card (README.md: YAML metadata in the Hugging Face Hub's conventions, with a model-index
of every evaluated accuracy, then prose) and RobustBench's model_info, both from the export's config.json."""

import json
import re
from typing import Any

from backsmooth.units import NORM_TEXT, eps_text, threat_model_text

HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "mnist": "mnist"}  # ours -> the Hub's dataset ids
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "tiny_imagenet": "Tiny ImageNet",
                 "digits": "scikit-learn digits"}
ARCH_NAMES = {"resnet18": "ResNet-18", "preact_resnet18": "PreActResNet-18", "wrn34_10": "WideResNet-34-10",
              "small_cnn": "small CNN"}  # RobustBench's spellings where it has one
ROBUSTBENCH = {"datasets": {"cifar10": 10000, "cifar100": 10000}, "eps": {"linf": 8 / 255, "l2": 0.5}}


def _yaml(value: Any, indent: int = 0) -> str:
    """Block YAML for dicts, lists, strings, numbers, booleans and None; strings as JSON's double-quoted scalars
    (YAML reads them unchanged) with the characters YAML cannot hold raw escaped."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            key = _key(key)
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                first, *rest = _yaml(item, indent + 2).splitlines()
                lines.append("\n".join([f"{pad}- {first.lstrip()}", *rest]))
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return "\n".join(lines)
    return pad + _scalar(value)


def _key(key: Any) -> str:
    """A mapping key: plain when YAML 1.1 reads it back as the same string, else double-quoted (`on`, `no`,
    `null` and the like would come back as booleans or None)."""
    text = str(key)
    if _PLAIN_KEY.fullmatch(text) and text.lower() not in _YAML11_WORDS:
        return text
    return _scalar(text)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):  # empty
        return "{}" if isinstance(value, dict) else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # YAML 1.1 reads an exponent as a float only after a dot: 1.0e-06, not 1e-06
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    return _NOT_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(str(value), ensure_ascii=False))


# what YAML may not hold unescaped inside a double-quoted scalar: non-printable characters and its line breaks
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|[\x85\u2028\u2029]")


def percent(fraction: float) -> float:
    """An accuracy as the card and the model-index state it: percent, two decimals."""
    return round(100 * fraction, 2)


def _metrics(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    threat = threat_model_text(evaluation["norm"], evaluation["eps"])
    subset = dict(n_examples=evaluation["n_examples"], seed=evaluation["seed"], source=evaluation["source"])
    rows = [dict(type="accuracy", name="clean accuracy", value=percent(evaluation["clean_acc"]), args=subset)]
    for attack, accuracy in evaluation["per_attack"].items():
        rows.append(dict(type="accuracy", name=f"{attack} accuracy ({threat})", value=percent(accuracy),
                         args=dict(subset, **evaluation["attacks"].get(attack, {}))))
    if len(evaluation["per_attack"]) > 1:
        rows.append(dict(type="accuracy", name=f"worst-case accuracy ({threat})",
                         value=percent(evaluation["worst_case"]),
                         args=dict(subset, attacks=list(evaluation["per_attack"]))))
    return rows


def metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML header: library, tags, datasets and a model-index with every evaluated accuracy."""
    dataset, norm = config["dataset"], config["threat_model"]["norm"]
    results = [dict(task=dict(type="image-classification", name="Image Classification"),
                    dataset=dict(type=HUB_DATASETS.get(dataset, dataset), name=DATASET_NAMES.get(dataset, dataset),
                                 split="test"),
                    metrics=_metrics(evaluation)) for evaluation in config["evaluations"]]
    header: dict[str, Any] = dict(library_name="backsmooth", pipeline_tag="image-classification",
                                  tags=["adversarial-robustness", "robust-training", f"{NORM_TEXT[norm]}-robustness",
                                        config["training"]["method"], config["architecture"], "safetensors"])
    if dataset in HUB_DATASETS:
        header["datasets"] = [HUB_DATASETS[dataset]]
    header["metrics"] = ["accuracy"]
    if results:
        header["model-index"] = [dict(name=config["name"], results=results)]
    return header


def _attack_text(name: str, settings: dict[str, Any]) -> str:
    if settings.get("version") or settings.get("package"):
        return f"`{name}`: AutoAttack {settings.get('version', '')} ({settings.get('package', 'package unknown')})"
    parts = [str(settings.get("kind", name)).upper(), settings.get("loss")]
    if "steps" in settings:
        parts.append(f"{settings['steps']} steps of {settings.get('step_size', 0):.4g}")
    if settings.get("random_start"):
        restarts = int(settings.get("restarts", 1))
        parts.append(f"random start, {restarts} restart{'s' * (restarts != 1)}")
    return f"`{name}`: " + ", ".join(str(p) for p in parts if p)


def _robustness(config: dict[str, Any]) -> list[str]:
    if not config["evaluations"]:
        return ["**Not evaluated.** Evaluate the run (`backsmooth eval RUN_DIR --attacks pgd20,cw20,autoattack`) and "
                "export it again, or evaluate this folder the same way.", ""]
    lines = []
    for e in config["evaluations"]:
        what = ("The training run's own final check" if e["source"] == "summary.json"
                else f"`backsmooth eval` ({e['source']})")
        of = f" of {e['test_size']:,}" if e["test_size"] else ""
        lines += [f"**{what}**: {threat_model_text(e['norm'], e['eps'])}, {e['n_examples']:,}{of} test examples "
                  f"(stratified, seed {e['seed']}).", "",
                  "| clean | " + " | ".join(e["per_attack"]) + " | worst case |",
                  "|---" * (len(e["per_attack"]) + 2) + "|",
                  "| " + " | ".join(f"{percent(v):.2f}" for v in (e["clean_acc"], *e["per_attack"].values(),
                                                                  e["worst_case"])) + " |", ""]
        lines += [f"- {_attack_text(name, e['attacks'].get(name, {}))}" for name in e["per_attack"]] + [""]
    lines += ["Accuracies in percent. Worst case: an example counts as robust only if it is classified correctly clean "
              "and under every attack of that evaluation. One standard error of an accuracy p on n examples is "
              "sqrt(p (1 - p) / n): about 1.5 points at p = 0.5 and n = 1,000.", ""]
    return lines


def _training(config: dict[str, Any]) -> list[str]:
    t = config["training"]
    options = ", ".join(f"{k} = {v}" for k, v in t["method_options"].items()) or "its defaults"
    chosen = (f"best.pt, the epoch ({t['checkpoint_epoch']}) of the best validation PGD-{t['val_pgd_steps']} accuracy"
              if t["checkpoint"] == "best" else f"last.pt, after epoch {t['checkpoint_epoch']}")
    seconds, processes, epochs = t.get("train_seconds"), int(t.get("processes") or 1), int(t["epochs"])
    time = ((f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min") + " of training"
            if isinstance(seconds, (int, float)) else "training time not recorded")
    lines = [f"- Method: `{t['method']}` with {options}, at {config['threat_model']['text']}.",
             f"- Recipe: {epochs} epoch{'s' * (epochs != 1)}, batch {t['batch_size']}, SGD {t['schedule']} lr "
             f"{t['lr']}, momentum {t['momentum']}, weight decay {t['weight_decay']}, weight averaging "
             f"{t['weight_averaging']}, label smoothing {t['label_smoothing']}, {t['precision']}, seed {t['seed']}.",
             f"- Checkpoint: {chosen}.",
             f"- Time: {time} (evaluation and the collapse guard's checks excluded) on "
             f"{t.get('device') or 'a device the run did not record'}, {processes} process"
             f"{'es' * (processes != 1)}."]
    if t.get("collapse"):
        lines.append(f"- The collapse guard recorded an event: {json.dumps(t['collapse'])}.")
    return lines + [""]


def _data(config: dict[str, Any]) -> list[str]:
    note = config.get("data_note") or "not recorded"
    lines = [f"{DATASET_NAMES.get(config['dataset'], config['dataset'])}: {note}."]
    if "jpeg" in note.lower():
        lines.append("**The images were JPEG-compressed**, so accuracies are not comparable with published numbers "
                     "on the original dataset; comparisons between models trained and evaluated on this copy are.")
    return lines + [""]


def model_card(config: dict[str, Any], robustbench: bool = False) -> str:
    """README.md of the export: the YAML header, then what the model is, its robustness, training, data, how to
    load it and, with `robustbench`, what a RobustBench submission still needs."""
    shape = "x".join(str(n) for n in config["input_size"] or [])
    dataset = DATASET_NAMES.get(config["dataset"], config["dataset"])
    lines = ["---", _yaml(metadata(config)), "---", "", f"# {config['name']}", "",
             f"A {config['architecture']} image classifier for {dataset} "
             f"({config['num_classes']} classes; inputs {shape} in [0, 1], normalised inside the model), trained to be "
             f"robust at {config['threat_model']['text']} with `{config['training']['method']}` by backsmooth "
             f"{config['backsmooth_version']}.", "", "## Robustness", "", *_robustness(config),
             "## Training", "", *_training(config), "## Data", "", *_data(config), "## How to load", "",
             "```python", "import backsmooth",
             f'model = backsmooth.load("path/to/{config["name"]}")  # or a Hub id "owner/name"; eval mode',
             "logits = model(images)  # images: float (N, " + ", ".join(
                 str(n) for n in config["input_size"] or ["C", "H", "W"]) + ") in [0, 1]",
             "```", "",
             "Without backsmooth's loader: `safetensors.torch.load_file(\"model.safetensors\")` gives the state dict "
             "of "
             f"`backsmooth.models.build(\"{config['architecture']}\", {config['num_classes']}, in_channels="
             f"{config['checkpoint']['in_channels']})`, normalisation buffers included. Evaluate it again with "
             f"`backsmooth eval FOLDER --attacks pgd20,cw20,autoattack`.", ""]
    if robustbench:
        lines += ["## RobustBench", "", "model_info in RobustBench's layout: `robustbench/model_info/"
                  f"{config['dataset']}/{NORM_TEXT[config['threat_model']['norm']]}/{config['name']}.json`. "
                  "A submission still needs:", "", *(f"- {need}" for need in robustbench_needs(config)), ""]
    return "\n".join(lines)


def _autoattack(config: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation with standard AutoAttack on the most examples, if any."""
    runs = [e for e in config["evaluations"] if "autoattack" in e["per_attack"]]
    return max(runs, key=lambda e: e["n_examples"]) if runs else None


def robustbench_info(config: dict[str, Any]) -> dict[str, Any]:
    """RobustBench's model_info fields (percent strings, eps like '8/255'); paper fields left for the author."""
    evaluation = _autoattack(config) or max(config["evaluations"], key=lambda e: e["n_examples"], default=None)
    norm, eps = config["threat_model"]["norm"], config["threat_model"]["eps"]
    info: dict[str, Any] = dict(link="", name="", authors="", additional_data=False, number_forward_passes=1,
                                dataset=config["dataset"], venue="",
                                architecture=ARCH_NAMES.get(config["architecture"], config["architecture"]),
                                eps=eps_text(eps) if norm == "linf" else f"{eps:g}")
    if evaluation is not None:
        info["clean_acc"] = f"{percent(evaluation['clean_acc']):.2f}"
    if evaluation is not None and "autoattack" in evaluation["per_attack"]:
        info["reported"] = info["autoattack_acc"] = f"{percent(evaluation['per_attack']['autoattack']):.2f}"
    if "jpeg" in (config.get("data_note") or "").lower():
        info["footnote"] = "Trained and evaluated on a JPEG-compressed copy of the dataset."
    info["unreliable"] = False
    return info


def robustbench_needs(config: dict[str, Any]) -> list[str]:
    """What stands between this export and a RobustBench submission."""
    dataset, norm, eps = config["dataset"], config["threat_model"]["norm"], config["threat_model"]["eps"]
    needs = []
    if dataset not in ROBUSTBENCH["datasets"]:
        needs.append(f"a RobustBench dataset: {dataset} is not one of {', '.join(ROBUSTBENCH['datasets'])}")
    else:
        if "jpeg" in (config.get("data_note") or "").lower():
            needs.append("training and evaluation on the original images: this model saw a JPEG-compressed copy")
        if norm not in ROBUSTBENCH["eps"] or abs(eps - ROBUSTBENCH["eps"][norm]) > 1e-9:
            needs.append(f"the leaderboard's threat model: {threat_model_text(norm, eps)} is not "
                         + " or ".join(threat_model_text(n, e) for n, e in ROBUSTBENCH["eps"].items()))
        full, evaluation = ROBUSTBENCH["datasets"][dataset], _autoattack(config)
        if evaluation is None or evaluation["n_examples"] < full:
            needs.append(f"standard AutoAttack on the whole test set ({full:,} images): `backsmooth eval RUN_DIR "
                         f"--attacks autoattack --n-examples {full}`, then export again")
    return needs + ["the paper fields of model_info (link, name, authors, venue)",
                    f"a model definition in RobustBench's model zoo that builds this {config['architecture']} with "
                    "the normalisation inside, and the weights at a stable download link (a Hub repository works)"]
