"""vLLM's API as its own source declares it, read with ast (vLLM needs CUDA and its own torch, so it is never
imported here), and the checks that tests/fake_vllm.py and trainer/vllm_engine.py keep to it.

The glue tests run the engine on the fake, so the engine can only call what the fake has; `check` shows
that the fake has only what vLLM has (names, defaults, positional / keyword-only parameters), that the
engine's literal arguments are values vLLM accepts, and that the attribute route of the weight sync
exists in vLLM's classes. `check` returns the problems found, each naming the vLLM file and name."""

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

FAKE = Path(__file__).with_name("fake_vllm.py")

# the fake's class -> the vLLM classes it stands for (file under the source root, class)
COUNTERPARTS = {
    "LLM": [("vllm/entrypoints/llm.py", "LLM")],
    "SamplingParams": [("vllm/sampling_params.py", "SamplingParams")],
    "RequestOutput": [("vllm/outputs.py", "RequestOutput")],
    "CompletionOutput": [("vllm/outputs.py", "CompletionOutput")],
    "Logprob": [("vllm/logprobs.py", "Logprob")],
    "WorkerModel": [("vllm/model_executor/models/llama.py", "LlamaForCausalLM"),
                    ("vllm/model_executor/models/qwen2.py", "Qwen2ForCausalLM")],
}
# the fake's classes the engine constructs (the others' constructors are the fake's own business)
CONSTRUCTED = {"LLM"}
# LLM.__init__ hands its **kwargs to EngineArgs
KWARGS_TARGET = {("vllm/entrypoints/llm.py", "LLM", "__init__"): ("vllm/engine/arg_utils.py", "EngineArgs")}
# defaults written as ModelConfig.logprobs_mode and the like
DEFAULT_HOLDERS = {
    "ModelConfig": ("vllm/config/model.py", "ModelConfig"),
    "ParallelConfig": ("vllm/config/parallel.py", "ParallelConfig"),
    "LoadConfig": ("vllm/config/load.py", "LoadConfig"),
    "CacheConfig": ("vllm/config/cache.py", "CacheConfig"),
}
# the engine's LLM arguments whose values vLLM declares as a Literal
LITERAL_ARGS = {
    "load_format": ("vllm/model_executor/model_loader/__init__.py", "LoadFormats"),
    "logprobs_mode": ("vllm/config/model.py", "LogprobsMode"),
    "distributed_executor_backend": ("vllm/config/parallel.py", "DistributedExecutorBackend"),
    "dtype": ("vllm/config/model.py", "ModelDType"),
}
# trainer.vllm_engine.WORKER_MODEL_ATTRS, hop by hop: the class that sets self.<hop>
ROUTE = [
    ("vllm/entrypoints/llm.py", "LLM", "llm_engine"),
    ("vllm/v1/engine/llm_engine.py", "LLMEngine", "model_executor"),
    ("vllm/v1/executor/uniproc_executor.py", "UniProcExecutor", "driver_worker"),
    ("vllm/v1/worker/gpu_worker.py", "Worker", "model_runner"),  # through WorkerWrapperBase.__getattr__
    ("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", "model"),
]
WRAPPER = ("vllm/v1/worker/worker_base.py", "WorkerWrapperBase")
EXTERNAL_LAUNCHER = ("vllm/v1/executor/uniproc_executor.py", "ExecutorWithExternalLauncher", "UniProcExecutor")
ENVS = "vllm/envs.py"
FILES = sorted({f for targets in COUNTERPARTS.values() for f, _ in targets} | {f for f, _ in KWARGS_TARGET.values()}
               | {f for f, _ in DEFAULT_HOLDERS.values()} | {f for f, _ in LITERAL_ARGS.values()}
               | {f for f, _, _ in ROUTE} | {WRAPPER[0], EXTERNAL_LAUNCHER[0], ENVS})

NO_DEFAULT = object()
UNKNOWN = object()  # a default that is no literal (a call, a name): not compared


@dataclass(frozen=True)
class Param:
    name: str
    keyword_only: bool
    default: object


@dataclass(frozen=True)
class Signature:
    params: tuple
    var_keyword: bool

    def positional(self) -> list:
        return [p.name for p in self.params if not p.keyword_only]

    def get(self, name: str):
        return next((p for p in self.params if p.name == name), None)


@cache
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _class(root: Path, file: str, name: str) -> ast.ClassDef | None:
    path = root / file
    if not path.exists():
        return None
    return next((n for n in _module(path).body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _methods(cls: ast.ClassDef) -> dict:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _fields(cls: ast.ClassDef) -> dict:
    """A dataclass's / msgspec Struct's annotated fields and their default nodes (None: no default)."""
    return {n.target.id: n.value for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _default(node, root: Path):
    if node is None:
        return NO_DEFAULT
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in DEFAULT_HOLDERS:
        holder = _class(root, *DEFAULT_HOLDERS[node.value.id])
        if holder is not None and node.attr in _fields(holder):
            return _default(_fields(holder)[node.attr], root)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Field", "field"):
        value = next((k.value for k in node.keywords if k.arg == "default"), None)
        return UNKNOWN if value is None else _default(value, root)
    return UNKNOWN


def _signature(fn: ast.FunctionDef, root: Path) -> Signature:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [Param(p.arg, False, _default(d, root)) for p, d in zip(positional, defaults, strict=True)]
    params += [Param(p.arg, True, _default(d, root)) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return Signature(tuple(params), a.kwarg is not None)


def _kw_only(cls: ast.ClassDef) -> bool:
    return any(isinstance(d, ast.Call) and any(k.arg == "kw_only" and getattr(k.value, "value", False) is True
                                               for k in d.keywords) for d in cls.decorator_list)


def _fields_signature(cls: ast.ClassDef, root: Path) -> Signature:
    keyword_only = _kw_only(cls)
    return Signature(tuple(Param(n, keyword_only, _default(d, root)) for n, d in _fields(cls).items()), False)


def _init_signature(cls: ast.ClassDef, root: Path) -> Signature:
    init = _methods(cls).get("__init__")
    return _signature(init, root) if init is not None else _fields_signature(cls, root)


def _self_attrs(cls: ast.ClassDef) -> set:
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        names |= {t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                  and t.value.id == "self"}
    return names


def _literal_values(root: Path, file: str, name: str) -> set | None:
    path = root / file
    if not path.exists():
        return None
    for node in _module(path).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Subscript):
            elts = node.value.slice.elts if isinstance(node.value.slice, ast.Tuple) else [node.value.slice]
            return {e.value for e in elts if isinstance(e, ast.Constant)}
    return None


def _compare(where: str, fake: Signature, real: Signature, extra: Signature | None) -> list:
    """The fake's parameters against the real ones (extra: where the real **kwargs go)."""
    problems = []
    real_positional = real.positional()
    fake_positional = fake.positional()
    if fake_positional != real_positional[:len(fake_positional)]:
        problems.append(f"{where}: positional parameters {fake_positional} are not vLLM's {real_positional}")
    for p in fake.params:
        q = real.get(p.name)
        if q is None and extra is not None and real.var_keyword:
            q = extra.get(p.name)
        if q is None:
            problems.append(f"{where}: vLLM has no parameter or field '{p.name}'")
            continue
        if q.keyword_only and not p.keyword_only:
            problems.append(f"{where}: '{p.name}' is keyword-only in vLLM")
        if p.default is not NO_DEFAULT and q.default is NO_DEFAULT:
            problems.append(f"{where}: '{p.name}' has no default in vLLM")
        elif p.default is not NO_DEFAULT and q.default is not UNKNOWN and p.default != q.default:
            problems.append(f"{where}: '{p.name}' defaults to {q.default!r} in vLLM, not {p.default!r}")
    return problems


def check_fake(root: Path, fake: Path = FAKE) -> list:
    problems = []
    for cls in (n for n in _module(fake).body if isinstance(n, ast.ClassDef)):
        if cls.name not in COUNTERPARTS:
            problems.append(f"fake_vllm.{cls.name}: no vLLM counterpart declared in COUNTERPARTS")
            continue
        fake_methods = {k: v for k, v in _methods(cls).items()
                        if not k.startswith("_") or (k == "__init__" and cls.name in CONSTRUCTED)}
        for file, name in COUNTERPARTS[cls.name]:
            real = _class(root, file, name)
            where = f"{file}:{name}"
            if real is None:
                problems.append(f"{where}: no such class")
                continue
            if "__init__" not in _methods(cls):  # a dataclass: its fields are read or passed by name
                problems += _compare(where, _fields_signature(cls, fake.parent), _init_signature(real, root), None)
            real_methods = _methods(real)
            for method, fn in fake_methods.items():
                if method not in real_methods:
                    problems.append(f"{where}: no method '{method}'")
                    continue
                target = KWARGS_TARGET.get((file, name, method))
                holder = _class(root, *target) if target is not None else None
                extra = _init_signature(holder, root) if holder is not None else None
                problems += _compare(f"{where}.{method}", _signature(fn, fake.parent),
                                     _signature(real_methods[method], root), extra)
    return problems


def check_literals(root: Path, llm_kwargs: dict) -> list:
    problems = []
    for arg, (file, name) in LITERAL_ARGS.items():
        if arg not in llm_kwargs or llm_kwargs[arg] is None:
            continue
        values = _literal_values(root, file, name)
        if values is None:
            problems.append(f"{file}: no Literal '{name}' (the values of LLM's '{arg}')")
        elif llm_kwargs[arg] not in values:
            problems.append(f"{file}:{name}: '{llm_kwargs[arg]}' (LLM's '{arg}') is not one of {sorted(values)}")
    return problems


def check_route(root: Path, attrs: tuple, env: dict) -> list:
    problems = []
    if tuple(hop for _, _, hop in ROUTE) != tuple(attrs):
        problems.append(f"the engine's route {attrs} is not the checked one {[hop for _, _, hop in ROUTE]}")
    for file, name, hop in ROUTE:
        cls = _class(root, file, name)
        if cls is None:
            problems.append(f"{file}: no class {name}")
        elif hop not in _self_attrs(cls):
            problems.append(f"{file}:{name}: never sets self.{hop}")
    wrapper = _class(root, *WRAPPER)
    if wrapper is None or "__getattr__" not in _methods(wrapper) or "worker" not in _self_attrs(wrapper):
        problems.append(f"{WRAPPER[0]}:{WRAPPER[1]}: no __getattr__ forwarding to self.worker (driver_worker -> "
                        "model_runner)")
    file, name, base = EXTERNAL_LAUNCHER
    launcher = _class(root, file, name)
    if launcher is None or base not in {b.id for b in launcher.bases if isinstance(b, ast.Name)}:
        problems.append(f"{file}: no class {name}({base}) (distributed_executor_backend='external_launcher')")
    env_names = set()
    if (root / ENVS).exists():
        for node in ast.walk(_module(root / ENVS)):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == "environment_variables" and isinstance(node.value, ast.Dict):
                env_names = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    problems += [f"{ENVS}: no environment variable {k}" for k in env if k not in env_names]
    return problems


def check(root: Path, llm_kwargs: dict, attrs: tuple, env: dict, fake: Path = FAKE) -> list:
    """Every problem found in vLLM's source under root (the folder holding vllm/)."""
    _module.cache_clear()
    return check_fake(root, fake) + check_literals(root, llm_kwargs) + check_route(root, attrs, env)
