"""Training configuration: dataclasses, loaded from TOML, every field overridable on the command line
as --section.field VALUE (or --field VALUE for top-level fields). Unknown keys and bad values are
errors that name the key."""

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field

from gxpo_kernels.loss.objectives import PolicyObjective, objective_checks
from gxpo_kernels.loss.settings import LOSS_AGGS
from gxpo_kernels.optim import RULES
from gxpo_kernels.optim.muon import MuonConfig

from .hf_tasks import ANSWER_FROM, is_local, parse_filter
from .plugins import PLUGINS
from .plugins.capo import CAPOConfig
from .plugins.grpo_lambda import GRPOLambdaConfig
from .plugins.xrpo import XRPOConfig


@dataclass
class RolloutConfig:
    engine: str = "hf"  # | "vllm"
    num_prompts: int = 8  # prompts per step
    group_size: int = 4  # completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    vllm_gpu_memory_utilization: float = 0.3  # the share of GPU memory the colocated vLLM engine may take
    vllm_sleep: bool = False  # vLLM sleeps between generates (weights offloaded, KV cache freed)

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("engine", self.engine in ("hf", "vllm"), "'hf' or 'vllm'"),
            ("num_prompts", self.num_prompts >= 1, ">= 1"),
            ("group_size", self.group_size >= 2, ">= 2 (group-normalized advantages need a group)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
        ]


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # k3 KL to a frozen reference copy (loaded only when > 0)
    loss_agg: str = "token-mean"
    max_completion_len: int | None = None  # Dr. GRPO constant; None: rollout.max_new_tokens
    log_ratio_clamp: float | None = None  # verl's guard: clamp logp - old_logp to [-c, c] before exp (verl: 20)
    skip_zero_advantage: bool = True  # zero-advantage completions leave the passes where exact (beta 0, no
    # entropy gate; trainer/closure.py skips_zero_advantages)
    pack: bool = True  # padding-free packed micro-batches (trainer/packing.py); false: padded rows
    max_tokens_per_micro_batch: int = 0  # packed: token budget per micro-batch; 0: the whole batch in one
    micro_batch_size: int = 0  # padded (pack = false): sequences per micro-batch; 0: the whole batch
    objective: str = "grpo_kernels"  # | "policy": the [objective] section's loss (TRL's loss types) on the
    # vocabulary primitive's per-token log-probs and entropies
    # adaptive entropy control (loss.objective = "policy"), TRL's names and defaults: objective.entropy_coef is the
    # starting coefficient, moved by entropy_coef_delta toward entropy_target once per step
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        policy = self.objective == "policy"
        defaults = LossConfig()
        return [
            ("objective", self.objective in LOSS_OBJECTIVES, f"one of {LOSS_OBJECTIVES}"),
            *[(name, not policy or getattr(self, name) == getattr(defaults, name),
               f"left at its default ({getattr(defaults, name)!r}) with loss.objective = 'policy': {instead}")
              for name, instead in GRPO_KERNEL_FIELDS.items()],
            *[(name, policy or getattr(self, name) == getattr(defaults, name),
               f"left at its default ({getattr(defaults, name)!r}) unless loss.objective = 'policy'")
              for name in ADAPTIVE_ENTROPY_FIELDS],
            ("entropy_coef_max", self.entropy_coef_min <= self.entropy_coef_max, ">= loss.entropy_coef_min"),
            ("entropy_coef_delta", self.entropy_coef_delta >= 0, ">= 0"),
            ("eps_low", 0 < self.eps_low < 1, "in (0, 1)"),
            ("eps_high", 0 < self.eps_high < 1, "in (0, 1)"),
            ("beta", self.beta >= 0, ">= 0 (0: no KL term, no reference model)"),
            ("loss_agg", self.loss_agg in LOSS_AGGS, f"one of {LOSS_AGGS}"),
            ("max_completion_len", self.max_completion_len is None or self.max_completion_len >= 1,
             ">= 1 or none (rollout.max_new_tokens)"),
            ("micro_batch_size", self.micro_batch_size >= 0, ">= 0"),
            ("log_ratio_clamp", self.log_ratio_clamp is None or self.log_ratio_clamp > 0,
             "> 0 or none (off)"),
            ("max_tokens_per_micro_batch", self.max_tokens_per_micro_batch >= 0, ">= 0"),
        ]


LOSS_OBJECTIVES = ("grpo_kernels", "policy")
# [loss]'s fields that only the GRPO kernels read, and where loss.objective = "policy" takes each from
GRPO_KERNEL_FIELDS = {"eps_low": "set objective.epsilon", "eps_high": "set objective.epsilon_high",
                      "beta": "set objective.beta", "loss_agg": "set objective.loss_type",
                      "max_completion_len": "set objective.max_completion_length",
                      "log_ratio_clamp": "the policy objectives have no log-ratio clamp (objective.delta caps the "
                                         "ratio)"}
ADAPTIVE_ENTROPY_FIELDS = ("use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
                           "entropy_target")


def _objective_checks(self, cfg) -> list:
    """[objective]: PolicyObjective's own checks with loss.objective = "policy", else every field at its default."""
    if cfg.loss.objective == "policy":
        return objective_checks(self)
    return [(f.name, getattr(self, f.name) == f.default,
             f"left at its default ({f.default!r}) unless loss.objective = 'policy'")
            for f in dataclasses.fields(PolicyObjective)]


def _to_objective(self) -> PolicyObjective:
    return PolicyObjective(**dataclasses.asdict(self))


# PolicyObjective's fields as the [objective] section (declared once, in gxpo_kernels/loss/objectives.py)
ObjectiveConfig = dataclasses.make_dataclass(
    "ObjectiveConfig",
    [(f.name, typing.get_type_hints(PolicyObjective)[f.name], field(default=f.default))
     for f in dataclasses.fields(PolicyObjective)],
    namespace={"checks": _objective_checks, "to_objective": _to_objective,
               "__doc__": "The [objective] section: gxpo_kernels.loss.PolicyObjective's fields, read when "
                          "loss.objective = 'policy'."})


OPTIMIZERS = ("adamw", "flat_adamw", "muon")


@dataclass
class OptimConfig:
    name: str = "adamw"  # | "flat_adamw": one Triton launch per step, GXPO/SFPO's snapshot fused in (CUDA) | "muon":
    # Muon on the hidden matrices, AdamW on the rest (gxpo_kernels/optim/muon.py; its own knobs: the [muon] section)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("lr", self.lr > 0, "> 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "two values in [0, 1), e.g. 0.9,0.99"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or none"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("name", self.name in OPTIMIZERS, f"one of {OPTIMIZERS}"),
        ]


@dataclass
class UpdateConfig:
    # PPO mini-batches: each rollout step's prompt groups (whole groups, in order) split into this many updates, each
    # a full rule step (GXPO's three passes) on its mini-batch with the advantages of the whole batch; the gate
    # observes once per rollout step (the GXPO authors' 64 prompts in mini-batches of 16: mini_batches = 4)
    mini_batches: int = 1

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        n, prompts = self.mini_batches, cfg.rollout.num_prompts
        return [("mini_batches", isinstance(n, int) and n >= 1 and prompts % n == 0,
                 f"an int >= 1 that divides rollout.num_prompts ({prompts}): mini-batches hold whole prompt groups")]


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # | "jsonl" | "hf"
    difficulty: int = 1
    path: str = ""  # jsonl: a file of {"question": ..., "answer": ...}
    dataset: str = ""  # hf: a hub id, or local parquet / json / jsonl / csv files (a file, a glob or a directory)
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    answer_from: str = "field"  # | "boxed": the last \boxed{} of the answer field (a worked solution)
    filter: str = ""  # "field=v1,v2": keep rows whose field is one of the values (e.g. "level=Level 3,Level 4")
    on_bad_record: str = "skip"  # | "error"
    reward: str = "math-verify"  # | "exact"
    format_reward: float = 0.0  # bonus for an answer in \\boxed{}; in [0, 1)
    system_prompt: str = "Solve the problem. Put the final answer in \\boxed{}."

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("name", self.name in ("arithmetic", "jsonl", "hf"), "'arithmetic', 'jsonl' or 'hf'"),
            ("path", self.name != "jsonl" or bool(self.path), "set for task.name = 'jsonl'"),
            ("dataset", self.name != "hf" or bool(self.dataset),
             "set for task.name = 'hf' (a hub id or local parquet / json / jsonl / csv files)"),
            ("answer_from", self.answer_from in ANSWER_FROM, f"one of {ANSWER_FROM}"),
            ("filter", _filter_ok(self.filter), "'field=value1,value2' or empty"),
            ("on_bad_record", self.on_bad_record in ("skip", "error"), "'skip' or 'error'"),
            ("reward", self.reward in ("math-verify", "exact"), "'math-verify' or 'exact'"),
            ("difficulty", self.difficulty >= 0, ">= 0"),
            ("format_reward", 0 <= self.format_reward < 1, "in [0, 1)"),
        ]


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (and after the last); 0: never
    num_problems: int = 16  # held-out problems (arithmetic: seeds disjoint from training)
    n_samples: int = 4  # completions per problem: pass@1 is averaged over them
    k: int = 4  # pass@k, k <= n_samples
    path: str = ""  # jsonl task: the held-out file; hf task: the held-out dataset (default: task.dataset)
    split: str = "test"  # hf task: the held-out split (same fields, answer_from and filter as the task)
    temperature: float | None = None  # sampling temperature of evaluation; none: rollout.temperature
    # Several benchmarks instead of the task's held-out set: [[eval.benchmarks]] tables in TOML, each
    # {name, path, split, question_field, answer_field, answer_from, filter, num_problems} (BENCHMARK_KEYS);
    # logged as eval/<name>/pass@1 and pass@k, with eval/pass@1 and pass@k their means.
    benchmarks: list = field(default_factory=list)

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        held_out = self.every and not self.benchmarks  # the task's own held-out set is evaluated
        return [
            ("every", self.every >= 0, ">= 0"),
            ("num_problems", self.num_problems >= 1, ">= 1"),
            ("n_samples", self.n_samples >= 1, ">= 1"),
            ("temperature", self.temperature is None or self.temperature > 0, "> 0 or none"),
            ("k", 1 <= self.k <= self.n_samples, "in [1, eval.n_samples]"),
            ("path", not (held_out and cfg.task.name == "jsonl") or bool(self.path),
             "set (a held-out JSONL file) when evaluating a jsonl task (or give eval.benchmarks)"),
            ("path", not (held_out and cfg.task.name == "hf" and is_local(cfg.task.dataset)) or bool(self.path),
             "set (held-out files) when evaluating an hf task on local files: local files have no splits, so "
             "task.dataset again would be the training rows (or give eval.benchmarks)"),
        ]


@dataclass
class LoRAConfig:
    r: int = 0  # 0: full fine-tuning; > 0: LoRA adapters through peft, the base weights frozen
    alpha: float = 256.0
    dropout: float = 0.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("r", self.r >= 0, ">= 0 (0 turns LoRA off)"),
            ("alpha", self.alpha > 0, "> 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("target_modules", bool(self.target_modules.strip(",").strip()), "a comma-separated module list"),
        ]


RECIPES = ("none",) + tuple(p.recipe for p in PLUGINS.values())


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"  # | "tiny-random" | a transformers model directory or hub id
    algo: str = "grpo"
    steps: int = 10
    seed: int = 0
    out: str = "runs/default"
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    dtype: str = "auto"  # compute dtype; auto: bf16 on GPU, fp32 on CPU. Parameters stay fp32 masters (FSDP2 mixed
    # precision casts bf16 copies for forward and backward, on any number of devices)
    bf16_params: bool = False  # opt-in: parameters and AdamW state stored in bf16 (memory); updates below bf16
    # resolution are then lost (at lr 1e-7 almost every weight stays put)
    attn_implementation: str = "auto"  # auto: flash_attention_2 when flash-attn is installed (CUDA), else sdpa
    liger_patches: bool = False  # Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels in the model (CUDA)
    activation_checkpointing: str = "off"  # | "full" (every decoder block) | "selective" (every other block)
    compile: bool = False  # torch.compile each decoder block
    on_nonfinite: str = "stop"  # a step whose loss is not finite: "stop" (raise, naming the step; resume from the
    # last checkpoint) | "skip" (the weights and optimizer state as before the step, recorded as nonfinite_skipped)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)  # Muon's knobs, read when optim.name = "muon"
    update: UpdateConfig = field(default_factory=UpdateConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    recipe: str = "none"  # switches a plug-in on with its defaults; its own flags still override
    xrpo: XRPOConfig = field(default_factory=XRPOConfig)
    capo: CAPOConfig = field(default_factory=CAPOConfig)
    grpo_lambda: GRPOLambdaConfig = field(default_factory=GRPOLambdaConfig)
    # each registered update rule's config as its section ([gxpo], --gxpo.alpha; gxpo_kernels/optim/registry.py),
    # read as cfg.<rule name>; `algo` picks the one that trains
    rules: dict = field(default_factory=lambda: {name: config() for name, config in RULES.items()})

    def __getattr__(self, name):
        rules = vars(self).get("rules", {})
        if name in rules:
            return rules[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    @property
    def rule(self):
        """The training update rule's config."""
        return self.rules[self.algo]

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("algo", self.algo in self.rules, f"one of {tuple(self.rules)}"),
            ("steps", self.steps >= 1, ">= 1"),
            ("attn_implementation", self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
             "'auto', 'sdpa', 'eager' or 'flash_attention_2'"),
            ("activation_checkpointing", self.activation_checkpointing in ("off", "full", "selective"),
             "'off', 'full' or 'selective'"),
            ("dtype", self.dtype in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
            ("on_nonfinite", self.on_nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
        ]


def _coerce(key, value, annotation):
    """value (from TOML or a CLI string) as the field's type, or a ValueError naming key."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = args[0]
    if annotation is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} is a list of tables: set it in a TOML file ([[{key}]] tables), "
                             "not on the command line")
        return list(value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if annotation is tuple:
            parts = value.split(",") if isinstance(value, str) else value
            return tuple(float(x) for x in parts)
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return annotation(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {getattr(annotation, '__name__', annotation)}"
                         ) from None


def sections(cfg) -> dict:
    """{name: section} of a TrainConfig: its dataclass fields' sections and each update rule's."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {**{k: v for k, v in values.items() if dataclasses.is_dataclass(v)}, **cfg.rules}


def _keys(obj) -> set:
    names = {f.name for f in dataclasses.fields(obj) if f.name != "rules"}
    return names | set(obj.rules) if isinstance(obj, TrainConfig) else names


def _set(cfg, dotted_key, value):
    obj, parts = cfg, dotted_key.split(".")
    for i, part in enumerate(parts):
        fields = _keys(obj)
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"unknown config key {dotted_key!r} ({'.'.join(parts[:i + 1])!r} is not one of: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ValueError(f"config key {dotted_key!r} is a section; set its fields, e.g. {dotted_key}.<field>")
            hints = typing.get_type_hints(type(obj))
            setattr(obj, part, _coerce(dotted_key, value, hints[part]))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ValueError(f"config key {dotted_key!r}: {part!r} is not a section")


def _flatten(table, prefix=""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load_config(toml_path=None, overrides=()) -> TrainConfig:
    """TrainConfig from defaults, then the TOML file, then (key, value) overrides; validated."""
    cfg = TrainConfig()
    if toml_path:
        with open(toml_path, "rb") as f:
            for key, value in _flatten(tomllib.load(f)):
                _set(cfg, key, value)
    for key, value in overrides:
        _set(cfg, key, value)
    if cfg.recipe not in RECIPES:
        raise ValueError(f"config key 'recipe' must be one of {RECIPES}")
    resolve_recipe(cfg)
    resolve_presets(cfg)
    resolve_objective(cfg)
    cfg.eval.benchmarks = [resolve_benchmark(i, b) for i, b in enumerate(cfg.eval.benchmarks)]
    if len({b["name"] for b in cfg.eval.benchmarks}) < len(cfg.eval.benchmarks):
        raise ValueError("config key 'eval.benchmarks': names must be unique")
    validate(cfg)
    return cfg


BENCHMARK_KEYS = {"name": None, "path": None, "split": "test", "question_field": "question", "answer_field": "answer",
                  "answer_from": "field", "filter": "", "num_problems": 0}  # None: required; num_problems 0: all


def resolve_benchmark(i: int, entry) -> dict:
    """One [[eval.benchmarks]] table, checked and with every key filled in (so config.toml records it)."""
    key = f"eval.benchmarks[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"config key {key!r} must be a table with keys {sorted(BENCHMARK_KEYS)}")
    if unknown := sorted(set(entry) - set(BENCHMARK_KEYS)):
        raise ValueError(f"config key {key!r}: unknown keys {unknown}; known: {sorted(BENCHMARK_KEYS)}")
    out = {k: entry.get(k, default) for k, default in BENCHMARK_KEYS.items()}
    for k in ("name", "path"):
        if not isinstance(out[k], str) or not out[k].strip():
            raise ValueError(f"config key '{key}.{k}' must be a non-empty string")
    if out["answer_from"] not in ANSWER_FROM:
        raise ValueError(f"config key '{key}.answer_from' must be one of {ANSWER_FROM}")
    if not _filter_ok(out["filter"]):
        raise ValueError(f"config key '{key}.filter' must look like 'field=value1,value2' or be empty")
    if not isinstance(out["num_problems"], int) or out["num_problems"] < 0:
        raise ValueError(f"config key '{key}.num_problems' must be an integer >= 0 (0: every problem)")
    return out


def resolve_presets(cfg: TrainConfig):
    """Each update rule's fields left none take its preset's values, so config.toml records what ran."""
    cfg.rules = {name: section.resolved() for name, section in cfg.rules.items()}


def resolve_objective(cfg: TrainConfig):
    """dr_grpo's normalizer left none is the rollout's max_new_tokens, so config.toml records it."""
    if cfg.loss.objective == "policy" and cfg.objective.max_completion_length is None:
        cfg.objective.max_completion_length = cfg.rollout.max_new_tokens


def resolve_recipe(cfg: TrainConfig):
    """Each plug-in's flags left unset (None) follow --recipe (its section's resolve)."""
    for plugin in PLUGINS.values():
        getattr(cfg, plugin.name).resolve(cfg.recipe == plugin.recipe)


def _filter_ok(spec: str) -> bool:
    try:
        parse_filter(spec)
    except ValueError:
        return False
    return True


def validate(cfg: TrainConfig):
    """Each section checks its own fields (its checks method); the first failure names section.field."""
    for prefix, section in [("", cfg)] + [(name + ".", section) for name, section in sections(cfg).items()]:
        for name, ok, expected in section.checks(cfg):
            if not ok:
                raise ValueError(f"config key '{prefix}{name}' must be {expected}")


def to_toml(cfg: TrainConfig) -> str:
    lines = [f"{f.name} = {_toml_value(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
             if f.name != "rules" and not dataclasses.is_dataclass(getattr(cfg, f.name))]
    for name, section in sections(cfg).items():
        if values := dataclasses.asdict(section):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v):
    if v is None:
        return '"none"'  # TOML has no null; _coerce reads "none" back as None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)
