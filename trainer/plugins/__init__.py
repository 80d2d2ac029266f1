"""Trainer plug-ins: published GRPO extensions, each filling slots of the trainer's step whose defaults
are plain GRPO's: the rollouts (allocation and prompt construction; one plug-in at most), the advantages
(after group normalization; the hooks run in registration order), what the step's rollouts teach the
plug-in's own state (observe), and the token mask (before the update). A plug-in's state (state: built
from the trainer, checkpointed with the run) is handed to its rollouts and observe hooks.
A plug-in is one module defining its config section and PLUGIN, plus its entry in the registration at the
end of this file and its field in trainer/config.py's TrainConfig; --recipe <its recipe> switches it on,
and the Trainer calls the hooks of every plug-in its config enables."""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Plugin:
    name: str  # its config section: cfg.<name> (a dataclass with checks(cfg) and resolve(recipe_on))
    recipe: str  # the --recipe that switches it on
    enabled: Callable  # cfg -> bool
    advantages: Callable | None = None  # (trainer, collected, adv) -> (adv, {stat: count})
    token_mask: Callable | None = None  # (trainer, batch, adv) -> (batch, {stat: value})
    state: Callable | None = None  # trainer -> an object with state_dict / load_state_dict for checkpoints, or None
    rollouts: Callable | None = None  # takes over trainer/collect.py's collect (its arguments and this plug-in's
    # state); one plug-in at most
    observe: Callable | None = None  # (trainer, keyed problems, collected, state) -> None: after the advantages


PLUGINS: dict = {}


def register(plugin: Plugin) -> Plugin:
    if plugin.name in PLUGINS:
        raise ValueError(f"plug-in {plugin.name!r} is registered twice")
    PLUGINS[plugin.name] = plugin
    return plugin


def enabled_plugins(cfg) -> list:
    return [p for p in PLUGINS.values() if p.enabled(cfg)]


from . import capo, grpo_lambda, xrpo  # noqa: E402

for _module in (xrpo, grpo_lambda, capo):  # the order the advantages hooks run in
    register(_module.PLUGIN)
