"""Configuration of the Mod-Squad multi-task mixture-of-experts vision transformer."""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
from typing import Any

from torch import nn
from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

# True while a saved config is read back (`from_dict`): a config.json may carry attributes someone set on a config
# (`config.foo = 1` is a Transformers convention, and Transformers' own tests set `rms_norm_eps` and friends), so
# unknown keys there are kept with a warning; a config built in code rejects them (a typo would otherwise vanish).
_READING_SAVED_CONFIG = contextvars.ContextVar("modsquad_reading_saved_config", default=False)

TASK_TYPES = (
    "image-classification",
    "semantic-segmentation",
    "object-detection",
    "depth-estimation",
)
CLASSIFICATION_PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# What a classification head reads: the final-normed [CLS] token (ViT), the mean of the final-normed patch tokens
# (global average pooling, which learns faster from scratch on small data), or both concatenated (DINOv2's linear
# classifier).
CLASSIFIER_POOLINGS = ("cls", "mean", "cls+mean")
# Block selections by name: "every_other" = blocks 1, 3, 5, ...; "even" = blocks 0, 2, 4, ... (attention experts
# interleaved with MLP experts, as the reference implementation's `twice_attn` / `twice_mlp` models do).
MOE_LAYER_PRESETS = ("all", "every_other", "even")
# How the model is told its task: a learned token after [CLS], or a learned embedding added to every token before
# every block (the reference implementation).
TASK_CONDITIONINGS = ("token", "embedding")
# Task types whose head predicts one of `num_labels` classes.
LABELLED_TASK_TYPES = ("image-classification", "semantic-segmentation", "object-detection")
# Box formats of detection datasets: COCO `(x_min, y_min, width, height)` or `(x_min, y_min, x_max, y_max)` pixels.
BBOX_FORMATS = ("xywh", "xyxy")


# Head options a task entry may set, per task type: option -> (default, kind). The heads read them through
# `task_option`, and the config checks every one that is given when it is built.
TASK_OPTIONS: dict[str, dict[str, tuple[float, str]]] = {
    "object-detection": {
        "output_stride": (4, "positive int"),  # pixels per output cell; must divide patch_size
        "head_channels": (64, "positive int"),
        "heatmap_loss_coef": (1.0, "positive number"),
        "box_loss_coef": (2.0, "positive number"),
    },
    "semantic-segmentation": {"decoder_channels": (256, "positive int")},
    "depth-estimation": {
        "decoder_channels": (256, "positive int"),
        "max_depth": (10.0, "positive number"),  # in label units; the head predicts max_depth * sigmoid(x)
        "silog_lambda": (0.5, "number in [0, 1]"),
        # Stored depth value x depth_scale = depth in label units (metres). Unset: float maps are metres, integer
        # maps (uint16 PNGs, as NYU's raw data and ScanNet store them) millimetres, i.e. 0.001.
        "depth_scale": (None, "positive number"),
    },
}
# Keys every task entry may have, and the keys of labelled task types and of each task type (besides its
# `TASK_OPTIONS`). Data options (`bbox_format`, `reduce_labels`, `depth_scale`) travel with the task so that
# training and evaluation read a dataset alike. Anything else is a typo and is rejected.
COMMON_TASK_KEYS = ("name", "type", "routable_experts", "routable_attention_experts")
LABEL_TASK_KEYS = ("num_labels", "labels", "id2label", "label2id")
TASK_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "image-classification": ("problem_type", "pooling"),
    "semantic-segmentation": ("ignore_index", "reduce_labels"),
    "object-detection": ("bbox_format",),
    "depth-estimation": (),
}


def task_option(task: dict[str, Any], key: str) -> float | None:
    """The head option `key` of a task entry (see `TASK_OPTIONS`), or its default; a ValueError names a bad value."""
    default, kind = TASK_OPTIONS[task["type"]][key]
    value = task.get(key, default)
    if value is None and default is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    valid = {
        "positive int": number and isinstance(value, int) and value > 0,
        "positive number": number and value > 0,
        "number in [0, 1]": number and 0 <= value <= 1,
    }[kind]
    if not valid:
        raise ValueError(f"task {task.get('name')!r}: {key} must be a {kind}, got {value!r}")
    return value


def did_you_mean(name: str, candidates) -> str:
    """` (did you mean 'x'?)` for the candidate closest to a mistyped `name`, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown_keys(keys, accepted, where: str, shown: str | None = None) -> None:
    """Raises a ValueError naming every key of `keys` not in `accepted`, with a "did you mean" hint and the accepted
    keys (or `shown`, a shorter description of them); `where` says what the keys belong to."""
    accepted = list(accepted)
    unknown = [key for key in keys if key not in accepted]
    if unknown:
        hints = ", ".join(f"{key!r}{did_you_mean(key, accepted)}" for key in unknown)
        raise ValueError(f"unknown {where} key(s) {hints}; accepted: {shown or sorted(accepted)}")


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a real bool; a ValueError otherwise (the string `'false'` would otherwise read as true)."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """Checks that `value` is a finite number (an int when `integer`) in the given range; returns it, or raises a
    ValueError naming `name`, the value and the accepted range. `None` passes when `optional`."""
    if value is None and optional:
        return value
    kinds = (int,) if integer else (int, float)
    is_number = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    below = minimum is not None and is_number and (value <= minimum if exclusive_minimum else value < minimum)
    above = maximum is not None and is_number and (value >= maximum if exclusive_maximum else value > maximum)
    if is_number and not below and not above:
        return value
    kind = "an int" if integer else "a finite number"
    if integer and minimum == 1 and maximum is None and not exclusive_minimum:
        accepted = "a positive int"
    elif minimum is not None and maximum is not None:
        accepted = f"{kind} in {'(' if exclusive_minimum else '['}{minimum}, {maximum}{')' if exclusive_maximum else ']'}"
    elif minimum is not None:
        accepted = f"{kind} {'>' if exclusive_minimum else '>='} {minimum}"
    elif maximum is not None:
        accepted = f"{kind} {'<' if exclusive_maximum else '<='} {maximum}"
    else:
        accepted = kind
    raise ValueError(f"{name} must be {accepted}{' or null' if optional else ''}, got {value!r}")


def reserved_task_names() -> frozenset[str]:
    """Names a task may not have: attributes of the `nn.ModuleDict` / `nn.ParameterDict` keyed by task names
    (`train`, `forward`, `state_dict`, `keys`, ...), which would collide with the task's module."""
    return frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_task_name(name: Any, where: str) -> str:
    """`name` if it can name a task: a Python identifier (it names modules and weights) that is not reserved (see
    `reserved_task_names`); a ValueError naming `where` otherwise."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where} must be a Python identifier (it names modules and weights), got {name!r}")
    if name in reserved_task_names() or name.startswith("_"):
        raise ValueError(
            f"{where}={name!r} is reserved: it is an attribute of the torch module holding the tasks' heads (like "
            f"'train', 'forward', 'state_dict', 'keys') or starts with '_'; rename the task, e.g. "
            f"'task_{name.lstrip('_')}'"
        )
    return name


def _task_labels(task: dict[str, Any], name: str, task_type: str) -> dict[int, str]:
    """The checked `id2label` of a labelled task entry, from `id2label`, `labels` or `num_labels`."""
    id2label = task.get("id2label")
    labels = task.pop("labels", None)
    if labels is not None:
        if isinstance(labels, (str, bytes, dict)) or not isinstance(labels, (list, tuple)) or not labels:
            raise ValueError(f"task {name!r}: labels must be a non-empty list of class names, got {labels!r}")
        from_labels = dict(enumerate(labels))
        if id2label is not None and {int(k): str(v) for k, v in id2label.items()} != {
            k: str(v) for k, v in from_labels.items()
        }:
            raise ValueError(f"task {name!r}: labels={labels!r} and id2label={id2label!r} disagree; give one")
        id2label = from_labels
    if id2label is None:
        num_labels = task.get("num_labels")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(
                f"task {name!r} ({task_type}) needs 'num_labels' (a positive int), 'labels' or 'id2label'; got "
                f"num_labels={num_labels!r}"
            )
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(
            f"task {name!r}: id2label must be a non-empty {{id: name}} mapping, got {id2label!r}"
        )
    try:
        id2label = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(
            f"task {name!r}: id2label keys must be class ids 0, 1, ..., got {list(id2label)}"
        ) from None
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"task {name!r}: id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}"
        )
    names = list(id2label.values())
    duplicates = sorted({label for label in names if names.count(label) > 1})
    if duplicates:
        raise ValueError(
            f"task {name!r}: duplicate class names {duplicates}; every class needs its own name (label2id maps "
            "names back to ids)"
        )
    if "num_labels" in task and task["num_labels"] != len(id2label):
        raise ValueError(
            f"task {name!r}: num_labels={task['num_labels']!r} disagrees with {len(id2label)} labels in id2label"
        )
    return id2label


def _normalise_task(entry: Any, position: int) -> dict[str, Any]:
    """Checks one task entry and returns it in canonical form (int-keyed `id2label`, derived fields filled)."""
    if not isinstance(entry, dict):
        raise ValueError(f"tasks[{position}] must be a dict with at least 'name' and 'type', got {entry!r}")
    task = dict(entry)
    name = check_task_name(task.get("name"), f"tasks[{position}]['name']")
    task_type = task.get("type")
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"tasks[{position}]['type'] is {task_type!r}; accepted task types are {list(TASK_TYPES)}"
        )
    reject_unknown_keys(task, accepted_task_keys(task_type), f"task {name!r} ({task_type})")

    if task_type in LABELLED_TASK_TYPES:
        id2label = _task_labels(task, name, task_type)
        task["id2label"] = id2label
        task["label2id"] = {label: i for i, label in id2label.items()}
        task["num_labels"] = len(id2label)

    if task_type == "image-classification":
        problem_type = task.setdefault("problem_type", "single_label_classification")
        if problem_type not in CLASSIFICATION_PROBLEM_TYPES:
            raise ValueError(
                f"task {name!r}: problem_type={problem_type!r}; accepted: {list(CLASSIFICATION_PROBLEM_TYPES)}"
            )
        if task.get("pooling", "cls") not in CLASSIFIER_POOLINGS:
            raise ValueError(
                f"task {name!r}: pooling={task['pooling']!r}; accepted: {list(CLASSIFIER_POOLINGS)}"
            )
    if task_type == "semantic-segmentation":
        ignore_index = task.setdefault("ignore_index", 255)
        check_number(f"task {name!r}: ignore_index", ignore_index, integer=True)
        if 0 <= ignore_index < task["num_labels"]:
            raise ValueError(
                f"task {name!r}: ignore_index={ignore_index} is a class id (num_labels={task['num_labels']}); "
                f"pick a value outside [0, {task['num_labels']}), e.g. 255 or -100"
            )
        if "reduce_labels" in task:
            check_bool(f"task {name!r}: reduce_labels", task["reduce_labels"])
    if task_type == "object-detection" and "bbox_format" in task and task["bbox_format"] not in BBOX_FORMATS:
        raise ValueError(
            f"task {name!r}: bbox_format={task['bbox_format']!r}; accepted: {list(BBOX_FORMATS)}"
        )
    for key in TASK_OPTIONS.get(task_type, {}):
        if key in task:
            task_option(task, key)
    return task


def accepted_task_keys(task_type: str) -> list[str]:
    """Every key a task entry of `task_type` may hold."""
    labelled = LABEL_TASK_KEYS if task_type in LABELLED_TASK_TYPES else ()
    return [
        *COMMON_TASK_KEYS,
        *labelled,
        *TASK_TYPE_KEYS.get(task_type, ()),
        *TASK_OPTIONS.get(task_type, {}),
    ]


# Range of every numeric field of the config (keyword arguments of `check_number`).
NUMERIC_FIELDS: dict[str, dict[str, Any]] = {
    "hidden_size": {"minimum": 1, "integer": True},
    "num_hidden_layers": {"minimum": 1, "integer": True},
    "num_attention_heads": {"minimum": 1, "integer": True},
    # Derived from hidden_size // num_attention_heads when not given.
    "head_dim": {"minimum": 1, "integer": True, "optional": True},
    "patch_size": {"minimum": 1, "integer": True},
    "num_channels": {"minimum": 1, "integer": True},
    "num_experts_per_tok": {"minimum": 1, "integer": True},
    "expert_intermediate_size": {"minimum": 1, "integer": True},
    "intermediate_size": {"minimum": 1, "integer": True, "optional": True},
    "hidden_dropout_prob": {"minimum": 0, "maximum": 1, "exclusive_maximum": True},
    "attention_probs_dropout_prob": {"minimum": 0, "maximum": 1, "exclusive_maximum": True},
    "drop_path_rate": {"minimum": 0, "maximum": 1, "exclusive_maximum": True},
    "layer_norm_eps": {"minimum": 0, "exclusive_minimum": True},
    "initializer_range": {"minimum": 0, "exclusive_minimum": True},
    # Router inputs are scaled by a factor drawn from [1 - jitter, 1 + jitter]: it must stay positive.
    "router_jitter_noise": {"minimum": 0, "maximum": 1, "exclusive_maximum": True},
    "router_noise_std": {"minimum": 0},
    # Defaults to initializer_range; 0 starts every router at zero.
    "router_init_std": {"minimum": 0, "optional": True},
    "mi_loss_coef": {"minimum": 0},
    "balance_loss_coef": {"minimum": 0},
    "z_loss_coef": {"minimum": 0},
    "chunk_size_feed_forward": {"minimum": 0, "integer": True},
}
# Fields that only mean something with `moe_attention=True`.
ATTENTION_EXPERT_FIELDS = (
    "attention_moe_layers",
    "attention_num_experts",
    "attention_experts_per_tok",
    "attention_expert_heads",
)
# Fields that are true or false (`None` allowed for the Transformers ones that default from elsewhere).
BOOL_FIELDS = ("qkv_bias", "moe_attention", "norm_topk_prob", "is_encoder_decoder")
OPTIONAL_BOOL_FIELDS = ("output_hidden_states", "return_dict")


def standard_config_kwargs() -> frozenset[str]:
    """Keyword arguments every `PreTrainedConfig` takes besides its dataclass fields: what
    `PreTrainedConfig.__post_init__`, `from_pretrained` and `from_dict` consume, what Transformers, quantizers and
    PEFT write into a config.json (`auto_map`, `quantization_config`, ...), the common attributes of configs of
    earlier Transformers versions, and the generation parameters older configs still carry (Transformers drops
    them). Any other keyword argument of [`ModSquadConfig`] is a typo and is rejected."""
    return frozenset(
        {
            "model_type", "num_labels", "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash",
            "output_attentions", "attn_implementation", "experts_implementation", "_attn_implementation_internal",
            "_experts_implementation_internal", "_attn_implementation_autoset", "per_layer_config",
            "tie_last_hidden_states", "auto_map", "custom_pipelines", "quantization_config", "_pre_quantization_dtype",
            "tie_word_embeddings", "torchscript", "pruned_heads", "is_decoder", "add_cross_attention",
            "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task", "task_specific_params",
            "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
            "decoder_start_token_id", "use_return_dict",
            *GenerationConfig._get_default_generation_params(),
        }
    )  # fmt: skip


class ModSquadConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ModSquadModel`]: a ViT whose MLP (and optionally attention) blocks are mixtures of experts,
    told its task by a learned task token and one router per task.

    Args:
        tasks (`list[dict]`, *optional*):
            One entry per task, in task-id order. Keys: `name` (identifier), `type` (one of
            `"image-classification"`, `"semantic-segmentation"`, `"object-detection"`, `"depth-estimation"`), and for
            labelled types `num_labels`, `labels` or `id2label`. Classification accepts `problem_type`
            (`"single_label_classification"`, `"multi_label_classification"` or `"regression"`); segmentation
            `ignore_index` (default 255). Any task accepts `routable_experts` (and, with `moe_attention`,
            `routable_attention_experts`): an int or one int per block with such experts, the number of leading
            experts the task may route to; [`add_task`] sets it on the tasks trained before the experts it adds, so
            they never see
            them. Defaults to one 1000-class classification task named `"cls"`.
        hidden_size (`int`, *optional*, defaults to 384): Width of the token embeddings.
        num_hidden_layers (`int`, *optional*, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 6): Attention heads per block.
        head_dim (`int`, *optional*): Width of one attention head (dense attention and attention experts); defaults
            to `hidden_size // num_attention_heads`. The reference Mod-Squad models use twice that.
        intermediate_size (`int`, *optional*): Width of the dense MLP of non-MoE blocks. Defaults to
            `num_experts_per_tok * expert_intermediate_size`, the active width of an MoE block.
        image_size (`int` or `list[int]`, *optional*, defaults to 224): Size the position embeddings are made for.
        patch_size (`int`, *optional*, defaults to 16): Side of the square patches.
        num_channels (`int`, *optional*, defaults to 3): Input channels.
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias on query, key and value projections.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): Activation of MLPs and experts.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout after MLPs and attention output.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout on attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.0): Stochastic depth, increasing linearly to this value.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02): Std of the truncated normal initialiser.
        num_experts (`int` or `list[int]`, *optional*, defaults to 16): MLP experts per MoE block; a list gives one
            count per MoE block (pruned models). A "MoE block" is one of `moe_layers` (MLP experts); the blocks with
            attention experts are `attention_moe_layers`, and the attention fields count per such block.
        num_experts_per_tok (`int`, *optional*, defaults to 4): Experts each token is routed to (top-k).
        expert_intermediate_size (`int`, *optional*, defaults to 384): Hidden width of one MLP expert.
        moe_layers (`str` or `list[int]`, *optional*, defaults to `"every_other"`): Which blocks have MLP experts:
            `"all"`, `"every_other"` (blocks 1, 3, 5, ...), `"even"` (blocks 0, 2, 4, ...) or a list of block indices.
        moe_attention (`bool`, *optional*, defaults to `False`): Give blocks a mixture of attention experts (own
            query and output projections, one shared key and value projection), in the blocks `attention_moe_layers`
            names.
        attention_moe_layers (`str` or `list[int]`, *optional*): Which blocks have attention experts (with
            `moe_attention`), as `moe_layers`; defaults to the blocks of `moe_layers`. The reference's interleaved
            layout is `moe_layers="every_other", attention_moe_layers="even"`.
        attention_num_experts (`int` or `list[int]`, *optional*): Attention experts per attention-MoE block; defaults
            to `num_experts`.
        attention_experts_per_tok (`int`, *optional*): Attention experts per token; defaults to
            `num_attention_heads // attention_expert_heads`.
        attention_expert_heads (`int`, *optional*): Query heads of one attention expert (the shared key and value
            projections have as many heads); defaults to `num_attention_heads // attention_experts_per_tok` when
            that is given, else to 1: with neither set, the reference's mixture of attention (one head per expert,
            one shared key/value head, as many experts per token as a dense block has heads).
        norm_topk_prob (`bool`, *optional*, defaults to `True`): Renormalise the top-k probabilities to sum to one.
        task_conditioning (`str`, *optional*, defaults to `"token"`): How the model is told its task: `"token"`, a
            learned task token after `[CLS]`; `"embedding"`, a learned task embedding added to every token before
            every block (the reference implementation; no extra token). Either way the per-task vectors are
            `embeddings.task_tokens`.
        router_init_std (`float`, *optional*): Std of the routers' truncated-normal initialisation; defaults to
            `initializer_range`, so that tokens spread over experts from the first step (the reference
            implementation's routers end up initialised alike). `0` starts every router at zero: uniform routing,
            every token on the same top-k experts until gradients or noise break the tie.
        router_jitter_noise (`float`, *optional*, defaults to 0.0): Multiplicative uniform jitter on router inputs
            while training.
        router_noise_std (`float`, *optional*, defaults to 0.0): Std of Gaussian noise added to router logits while
            training (noisy top-k gating).
        mi_loss_coef (`float`, *optional*, defaults to 0.01): Weight of the task-expert mutual-information loss.
        balance_loss_coef (`float`, *optional*, defaults to 0.0): Weight of the Switch-style load-balancing loss.
        z_loss_coef (`float`, *optional*, defaults to 0.001): Weight of the router z-loss.
        feature_layers (`list[int]`, *optional*): Blocks whose outputs dense heads read; defaults to four evenly
            spaced blocks ending with the last.
        pruned_experts (`list[list[int]]`, *optional*): Set by [`prune_for_task`]: for each MoE block, which experts
            of the unpruned model (indices into its experts, increasing) this model kept, one per expert here.
        pruned_attention_experts (`list[list[int]]`, *optional*): The same for the attention experts.
        pruned_from (`dict`, *optional*): Set by [`prune_for_task`]: the unpruned model this one was cut from:
            `name_or_path`, its `tasks` (names), `num_experts` / `attention_num_experts` and `num_parameters`.
        output_router_logits (`bool`, *optional*, defaults to `False`): Whether models return the routing tensors
            (`router_logits`, `router_probs`, `expert_indices`) and the per-batch router losses, which the heads
            then add to their loss; as in Transformers' MoE models, turn it on (or pass it to `forward`) to train
            with the auxiliary losses.
        head_task (`str`, *optional*): Set by a single-task model (`ModSquadFor<Type>`) on its own config: the task
            it serves, so that its checkpoint loads back into the same model when the config has several tasks of
            that type. The top-level `id2label` / `num_labels` / `problem_type` describe this task.

    Top-level `id2label` (`num_labels`) and `problem_type` are the labels of the task a single-task model serves:
    mirrored from the config's only labelled task, or set by the caller to relabel it
    (`ModSquadForImageClassification(config)` after `config.num_labels = 5`), as for any Transformers model.

    Example:

    ```python
    >>> from modsquad import ModSquadConfig, ModSquadModel
    >>> config = ModSquadConfig(
    ...     tasks=[{"name": "cls", "type": "image-classification", "labels": ["cat", "dog"]},
    ...            {"name": "seg", "type": "semantic-segmentation", "num_labels": 21}],
    ...     hidden_size=192, num_hidden_layers=6, num_attention_heads=3, num_experts=8, num_experts_per_tok=2,
    ... )
    >>> model = ModSquadModel(config)
    ```"""

    model_type = "modsquad"
    # Routing state rather than predictions: `transformers.Trainer` leaves these out of `predict` / `evaluate` outputs
    # even when a config asks for them (`output_router_logits=True`), so `compute_metrics` sees only the logits.
    keys_to_ignore_at_inference = ["aux_loss", "router_logits", "router_probs", "expert_indices"]

    tasks: list | None = None
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    head_dim: int | None = None
    intermediate_size: int | None = None
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    num_experts: int | list[int] = 16
    num_experts_per_tok: int = 4
    expert_intermediate_size: int = 384
    moe_layers: str | list[int] = "every_other"
    moe_attention: bool = False
    attention_moe_layers: str | list[int] | None = None
    attention_num_experts: int | list[int] | None = None
    attention_experts_per_tok: int | None = None
    attention_expert_heads: int | None = None
    norm_topk_prob: bool = True
    task_conditioning: str = "token"
    router_init_std: float | None = None
    router_jitter_noise: float = 0.0
    router_noise_std: float = 0.0
    mi_loss_coef: float = 0.01
    balance_loss_coef: float = 0.0
    z_loss_coef: float = 0.001
    feature_layers: list[int] | None = None
    pruned_experts: list[list[int]] | None = None
    pruned_attention_experts: list[list[int]] | None = None
    pruned_from: dict | None = None
    output_router_logits: bool = False
    head_task: str | None = None

    def __post_init__(self, **kwargs):
        own = sorted(set(self.accepted_keys()) - {f.name for f in dataclasses.fields(PreTrainedConfig)})
        own = [key for key in own if key in {f.name for f in dataclasses.fields(self)}]
        shown = (
            f"the ModSquadConfig fields {own} and the standard PreTrainedConfig keywords (num_labels, id2label, "
            "problem_type, return_dict, output_hidden_states, dtype, auto_map, ...)"
        )
        if _READING_SAVED_CONFIG.get():
            unknown = [key for key in kwargs if key not in self.accepted_keys()]
            if unknown:
                logger.warning(
                    f"the saved config has key(s) ModSquad does not use, kept as attributes: {unknown}; accepted: "
                    f"{shown}"
                )
        else:
            reject_unknown_keys(kwargs, self.accepted_keys(), "ModSquadConfig", shown=shown)
        if self.tasks is None:
            self.tasks = [{"name": "cls", "type": "image-classification", "num_labels": 1000}]
        self._validate_fields()
        self._validate_shape()
        self._validate_tasks()
        self._validate_moe()
        self._validate_routable_experts()
        self._validate_pruning()
        if self.head_task is not None and self.head_task not in self.task_names:
            raise ValueError(
                f"head_task={self.head_task!r} is not a task of this config; its tasks are {self.task_names}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = self.num_experts_per_tok * self.expert_intermediate_size
        if self.feature_layers is None:
            step = self.num_hidden_layers / 4
            self.feature_layers = sorted({max(0, round(step * (i + 1)) - 1) for i in range(4)})
        elif any(not 0 <= i < self.num_hidden_layers for i in self.feature_layers):
            raise ValueError(
                f"feature_layers={self.feature_layers} must index blocks 0..{self.num_hidden_layers - 1}"
            )
        # A config with a single labelled task exposes its labels at the top level, where pipelines read them.
        labelled = [t for t in self.tasks if "id2label" in t]
        given_labels = self.id2label is not None or kwargs.get("num_labels") is not None
        if len(labelled) == 1 and not given_labels:
            self.id2label = dict(labelled[0]["id2label"])
            self.label2id = dict(labelled[0]["label2id"])
        if len(labelled) == 1 and labelled[0]["type"] == "image-classification" and self.problem_type is None:
            self.problem_type = labelled[0]["problem_type"]
        super().__post_init__(**kwargs)
        if len(labelled) != 1 and not given_labels:
            # Top-level labels are those of the task a single-task model serves (see the class docstring); with no
            # single labelled task there are none, rather than the base class's two placeholder labels, which a
            # head built from this config would otherwise take for the caller's.
            self.id2label = None
            self.label2id = None

    # ----------------------------------------------------------------------------------------------- validation
    @classmethod
    def accepted_keys(cls) -> list[str]:
        """Every keyword argument the config takes: its fields and the standard `PreTrainedConfig` keywords."""
        return [f.name for f in dataclasses.fields(cls)] + sorted(standard_config_kwargs())

    def _validate_fields(self) -> None:
        """Type and range of every numeric and boolean field, naming the field and the accepted values."""
        for field, bounds in NUMERIC_FIELDS.items():
            check_number(field, getattr(self, field), **bounds)
        for field in BOOL_FIELDS:
            check_bool(field, getattr(self, field))
        for field in OPTIONAL_BOOL_FIELDS:
            if getattr(self, field) is not None:
                check_bool(field, getattr(self, field))
        if self.feature_layers is not None and (
            not isinstance(self.feature_layers, (list, tuple))
            or any(isinstance(i, bool) or not isinstance(i, int) for i in self.feature_layers)
        ):
            raise ValueError(
                f"feature_layers must be a list of block indices (ints), got {self.feature_layers!r}"
            )

    def _validate_shape(self) -> None:
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not a Transformers activation; accepted: {sorted(ACT2FN)}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; accepted head counts divide {self.hidden_size} (or set head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.task_conditioning, str) or self.task_conditioning not in TASK_CONDITIONINGS:
            raise ValueError(
                f"task_conditioning={self.task_conditioning!r}; accepted: {list(TASK_CONDITIONINGS)}"
                f"{did_you_mean(self.task_conditioning, TASK_CONDITIONINGS)}"
            )
        if self.router_init_std is None:
            self.router_init_std = self.initializer_range
        height, width = self.image_size_hw
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "the position embeddings need a whole number of patches"
            )

    def _validate_tasks(self) -> None:
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of task dicts, got {self.tasks!r}")
        self.tasks = [_normalise_task(entry, i) for i, entry in enumerate(self.tasks)]
        names = [t["name"] for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tasks has duplicate names {duplicates}; every task needs its own name")
        for task in self.tasks:
            if task["type"] == "object-detection" and self.patch_size % task_option(task, "output_stride"):
                raise ValueError(
                    f"task {task['name']!r}: output_stride={task_option(task, 'output_stride')} must divide patch_size="
                    f"{self.patch_size}; accepted strides are "
                    f"{[s for s in range(1, self.patch_size + 1) if self.patch_size % s == 0]}"
                )

    def _validate_moe(self) -> None:
        layers = self.moe_layer_indices  # validates moe_layers
        self.num_experts = self._per_layer_counts("num_experts", self.num_experts, len(layers))
        if self.num_experts_per_tok > min(self.experts_per_layer or [self.num_experts_per_tok]):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}; "
                "top-k must be at most the number of experts"
            )
        if not self.moe_attention:
            given = [f for f in ATTENTION_EXPERT_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but moe_attention=False: attention experts exist only with "
                    "moe_attention=True; set it, or drop these fields"
                )
            return
        attention_layers = self.attention_moe_layer_indices  # validates attention_moe_layers
        for field in ("attention_experts_per_tok", "attention_expert_heads"):
            value = getattr(self, field)
            # Either may still be None here: they are derived below.
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.attention_num_experts is None:
            if isinstance(self.num_experts, list) and len(self.num_experts) != len(attention_layers):
                raise ValueError(
                    f"num_experts={self.num_experts} has one count per MLP-expert block; set attention_num_experts "
                    f"for the {len(attention_layers)} attention-expert blocks"
                )
            self.attention_num_experts = self.num_experts
        self.attention_num_experts = self._per_layer_counts(
            "attention_num_experts", self.attention_num_experts, len(attention_layers), "MoE attention"
        )
        heads, per_tok = self.attention_expert_heads, self.attention_experts_per_tok
        if heads is None and per_tok is None:
            # The reference's mixture of attention: one head per expert, a dense block's head count per token.
            heads, per_tok = 1, self.num_attention_heads
        fewest = min(self.attention_experts_per_layer or [1])
        if per_tok is not None and per_tok > fewest:
            raise ValueError(
                f"attention_experts_per_tok={per_tok} exceeds attention_num_experts={self.attention_num_experts}"
            )
        if heads is None or per_tok is None:
            given, value = (
                ("attention_experts_per_tok", per_tok) if heads is None else ("attention_expert_heads", heads)
            )
            if self.num_attention_heads % value:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} is not divisible by {given}={value}; set "
                    "attention_expert_heads and attention_experts_per_tok both, or neither (one head per expert, "
                    f"{self.num_attention_heads} experts per token)"
                )
            heads, per_tok = (
                (self.num_attention_heads // value, value)
                if heads is None
                else (value, self.num_attention_heads // value)
            )
        if per_tok > fewest:
            raise ValueError(
                f"attention_experts_per_tok={per_tok} exceeds attention_num_experts={self.attention_num_experts}; "
                "set attention_experts_per_tok (and attention_expert_heads) or give more attention experts"
            )
        self.attention_expert_heads, self.attention_experts_per_tok = heads, per_tok

    def _validate_routable_experts(self) -> None:
        kinds = (
            ("routable_experts", self.experts_per_layer, self.num_experts_per_tok),
            ("routable_attention_experts", self.attention_experts_per_layer, self.attention_experts_per_tok),
        )
        for task in self.tasks:
            for key, counts, top_k in kinds:
                if key not in task:
                    continue
                if not counts:
                    raise ValueError(f"task {task['name']!r} sets {key} but the model has no such experts")
                field = f"task {task['name']!r}: {key}"
                task[key] = self._per_layer_counts(field, task[key], len(counts))
                limits = task[key] if isinstance(task[key], list) else [task[key]] * len(counts)
                if any(not top_k <= limit <= count for limit, count in zip(limits, counts)):
                    raise ValueError(
                        f"{field}={task[key]} must lie between the experts per token ({top_k}) and the experts of "
                        f"each MoE block ({counts})"
                    )

    def _validate_pruning(self) -> None:
        kinds = (
            ("pruned_experts", self.experts_per_layer),
            ("pruned_attention_experts", self.attention_experts_per_layer),
        )
        for field, counts in kinds:
            kept = getattr(self, field)
            if kept is None:
                continue
            if not counts:
                raise ValueError(
                    f"{field} is set but the model has no such experts (moe_attention={self.moe_attention})"
                )
            if not isinstance(kept, (list, tuple)) or len(kept) != len(counts):
                raise ValueError(
                    f"{field} must hold one list of kept expert indices per MoE block of its kind ({len(counts)} "
                    f"blocks), got {kept!r}"
                )
            for position, (layer, count) in enumerate(zip(kept, counts)):
                valid = isinstance(layer, (list, tuple)) and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layer
                )
                # Increasing order keeps the experts' relative order, hence top-k tie-breaking, as in the parent.
                if not valid or len(layer) != count or list(layer) != sorted(set(layer)):
                    raise ValueError(
                        f"{field}[{position}]={layer!r} must list {count} distinct increasing expert indices >= 0, "
                        f"one per expert of MoE block {position} (experts per block: {counts})"
                    )
            setattr(self, field, [list(layer) for layer in kept])
        if self.pruned_from is not None and (
            not isinstance(self.pruned_from, dict)
            or not isinstance(self.pruned_from.get("tasks"), list)
            or not all(isinstance(t, str) for t in self.pruned_from["tasks"])
        ):
            raise ValueError(
                "pruned_from must be a dict holding at least the parent's 'tasks' (a list of task names), "
                f"got {self.pruned_from!r}"
            )

    @staticmethod
    def _per_layer_counts(field: str, value: Any, num_moe_layers: int, kind: str = "MoE") -> int | list[int]:
        counts = value if isinstance(value, (list, tuple)) else [value]
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            raise ValueError(f"{field} must be a positive int or a list of them, got {value!r}")
        if isinstance(value, (list, tuple)):
            if len(value) != num_moe_layers:
                raise ValueError(
                    f"{field} has {len(value)} entries but there are {num_moe_layers} {kind} blocks; "
                    f"give one count per {kind} block or a single int"
                )
            return list(value)
        return value

    # -------------------------------------------------------------------------------------------------- derived
    @property
    def image_size_hw(self) -> tuple[int, int]:
        size = self.image_size
        sides = [size, size] if not isinstance(size, (list, tuple)) else list(size)
        if len(sides) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sides):
            raise ValueError(f"image_size must be a positive int or [height, width] of them, got {size!r}")
        return sides[0], sides[1]

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks whose MLP is a mixture of experts."""
        return self._resolve_layers("moe_layers", self.moe_layers)

    @property
    def attention_moe_layer_indices(self) -> list[int]:
        """Indices of the blocks whose attention is a mixture of attention experts (empty without `moe_attention`)."""
        if not self.moe_attention:
            return []
        if self.attention_moe_layers is None:
            return self.moe_layer_indices
        return self._resolve_layers("attention_moe_layers", self.attention_moe_layers)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: `[CLS]`, then the task token when `task_conditioning="token"`."""
        return 2 if self.task_conditioning == "token" else 1

    def _resolve_layers(self, field: str, layers: Any) -> list[int]:
        if layers == "all":
            return list(range(self.num_hidden_layers))
        if layers == "every_other":
            return list(range(1, self.num_hidden_layers, 2))
        if layers == "even":
            return list(range(0, self.num_hidden_layers, 2))
        if isinstance(layers, (list, tuple)):
            if any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers
                for i in layers
            ) or len(set(layers)) != len(layers):
                raise ValueError(
                    f"{field}={layers} must list distinct block indices in 0..{self.num_hidden_layers - 1}"
                )
            return sorted(layers)
        raise ValueError(
            f"{field}={layers!r}; accepted: {list(MOE_LAYER_PRESETS)} or a list of block indices"
        )

    @property
    def experts_per_layer(self) -> list[int]:
        """Number of MLP experts of each MoE block, in block order."""
        n = len(self.moe_layer_indices)
        return list(self.num_experts) if isinstance(self.num_experts, list) else [self.num_experts] * n

    @property
    def attention_experts_per_layer(self) -> list[int]:
        """Number of attention experts of each attention-MoE block, in block order (empty without
        `moe_attention`)."""
        if not self.moe_attention:
            return []
        n = len(self.attention_moe_layer_indices)
        counts = self.attention_num_experts
        return list(counts) if isinstance(counts, list) else [counts] * n

    @property
    def routable_experts_per_layer(self) -> list[list[int]]:
        """For each MoE block, how many of its leading MLP experts each task may route to (task order)."""
        return self._task_limits("routable_experts", self.experts_per_layer)

    @property
    def routable_attention_experts_per_layer(self) -> list[list[int]]:
        """For each attention-MoE block, how many of its leading attention experts each task may route to (empty
        without `moe_attention`)."""
        return self._task_limits("routable_attention_experts", self.attention_experts_per_layer)

    def _task_limits(self, key: str, counts: list[int]) -> list[list[int]]:
        per_task = []
        for task in self.tasks:
            limit = task.get(key, counts)
            per_task.append(limit if isinstance(limit, list) else [limit] * len(counts))
        return [list(block) for block in zip(*per_task)] if counts else []

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def task_index(self, task: str | int) -> int:
        """Returns the id of `task` (a name or an id), raising a ValueError that lists the model's tasks."""
        # bool is an int subclass, but `task=True` is a mistake, not task 1.
        if isinstance(task, int) and not isinstance(task, bool):
            if 0 <= task < self.num_tasks:
                return task
        elif isinstance(task, str) and task in self.task_names:
            return self.task_names.index(task)
        raise ValueError(f"unknown task {task!r}; this model's tasks are {self.task_names}")

    def get_task(self, task: str | int) -> dict[str, Any]:
        """The task entry for a name or id."""
        return self.tasks[self.task_index(task)]

    def tasks_of_type(self, task_type: str) -> list[str]:
        return [t["name"] for t in self.tasks if t["type"] == task_type]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """As [`PreTrainedConfig.from_dict`], for the usual ways to put a new head on a checkpoint:

        - `id2label` / `label2id` / `num_labels` / `problem_type` keyword arguments relabel the config's only labelled
          task; with several they stay top-level, where the single-task model built from the config applies them to
          the task it serves: `ModSquadForImageClassification.from_pretrained(path, num_labels=42,
          ignore_mismatched_sizes=True)`.
        - `tasks=[...]` replaces the task entries, checked and completed as by the constructor (the top-level labels,
          derived from the old entries, are derived again).
        """
        config_dict = dict(config_dict)
        if "tasks" in kwargs:
            config_dict = {k: v for k, v in config_dict.items() if k not in _TOP_LEVEL_LABEL_KEYS}
            config_dict["tasks"] = kwargs.pop("tasks")
            if config_dict.get("head_task") not in [t.get("name") for t in config_dict["tasks"] or []]:
                config_dict.pop("head_task", None)
        relabel = {key: kwargs.pop(key) for key in _TOP_LEVEL_LABEL_KEYS if key in kwargs}
        if relabel and len(_labelled_positions(config_dict.get("tasks"))) == 1:
            config_dict = _relabel_single_task(config_dict, relabel)
        else:
            kwargs.update(relabel)
        reading = _READING_SAVED_CONFIG.set(True)
        try:
            loaded = super().from_dict(config_dict, **kwargs)
        finally:
            _READING_SAVED_CONFIG.reset(reading)
        # Keyword arguments naming fields are set after construction (`from_pretrained(path, layer_norm_eps=0)`):
        # check them as the constructor checks its own.
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config._validate_fields()
        return loaded

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # JSON keys are strings; keep them that way explicitly so a round trip is stable.
        output["tasks"] = [
            {**t, "id2label": {str(k): v for k, v in t["id2label"].items()}} if "id2label" in t else dict(t)
            for t in self.tasks
        ]
        return output


# Top-level fields that describe the labels of the task a single-task model serves.
_TOP_LEVEL_LABEL_KEYS = ("id2label", "label2id", "num_labels", "problem_type")


def _labelled_positions(tasks: Any) -> list[int]:
    return [
        i for i, t in enumerate(tasks or []) if isinstance(t, dict) and t.get("type") in LABELLED_TASK_TYPES
    ]


def _relabel_single_task(config_dict: dict[str, Any], relabel: dict[str, Any]) -> dict[str, Any]:
    """`config_dict` with its only labelled task's labels (`id2label` and/or `num_labels`) and, for classification,
    `problem_type` replaced by `relabel`."""
    tasks = config_dict["tasks"]
    position = _labelled_positions(tasks)[0]
    task = dict(tasks[position])
    if relabel.get("id2label") is not None or relabel.get("num_labels") is not None:
        task = {k: v for k, v in task.items() if k not in ("labels", "id2label", "label2id", "num_labels")}
        if relabel.get("id2label") is not None:
            task["id2label"] = relabel["id2label"]
        if relabel.get("num_labels") is not None:
            task["num_labels"] = relabel["num_labels"]
    elif relabel.get("label2id") is not None:
        raise ValueError("label2id alone cannot relabel a task: give id2label (or num_labels) too")
    if relabel.get("problem_type") is not None:
        if task["type"] != "image-classification":
            raise ValueError(
                f"problem_type={relabel['problem_type']!r} applies to image-classification tasks; task "
                f"{task.get('name')!r} is a {task['type']} task"
            )
        task["problem_type"] = relabel["problem_type"]
    new_tasks = list(tasks)
    new_tasks[position] = task
    # The top-level labels mirror the task's (see `__post_init__`): drop the old ones so they are derived again.
    dropped = (*_TOP_LEVEL_LABEL_KEYS, "tasks")
    return {**{k: v for k, v in config_dict.items() if k not in dropped}, "tasks": new_tasks}


__all__ = ["TASK_CONDITIONINGS", "TASK_OPTIONS", "TASK_TYPES", "ModSquadConfig", "task_option"]
