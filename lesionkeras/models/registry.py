"""Model registry: later methods add their architectures by name.

Example:

```python
@register("unet")
def build_unet(input_shape=(None, None, 3), **kwargs): ...

model = build("unet", input_shape=(64, 64, 3), filters=8)
```
"""

import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

_BUILDERS = {}
_CAPABILITIES = {}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a registered model can do, so that nothing outside `models/` guesses it.

    Args:
        task: str. ISIC task: `segment` (Task 1), `attributes` or `classify`.
        size_multiple: int or str. The input side must be a multiple of this; a
            str names the builder option `d` whose `2**d` it is (e.g. `"depth"`).
        encoder: bool. The network nests an `"encoder"` model (it can be frozen
            and take pretrained weights).
        mc_dropout: bool. With `dropout > 0` it has a Monte-Carlo dropout layer.
        activation: str. What turns its logits into probabilities: `sigmoid`
            (one per channel).
    """

    task: str = "segment"
    size_multiple: int | str = 1
    encoder: bool = False
    mc_dropout: bool = False
    activation: str = "sigmoid"


def register(name, task="segment", **capabilities):
    """Decorator registering a builder `f(input_shape, out_channels, **options)`.

    Models of the other ISIC tasks (`task="classify"`, `"attributes"`) take their
    own arguments (e.g. `num_classes`) and are trained by their task's method.

    Args:
        name: str. The `model.name` of the builder.
        task: str. See `Capabilities`.
        **capabilities: the other fields of `Capabilities`.
    """
    caps = Capabilities(task=task, **capabilities)

    def wrap(fn):
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"Model `{name}` is already registered.")
        _BUILDERS[name] = fn
        _CAPABILITIES[name] = caps
        return fn

    return wrap


def capabilities(name) -> Capabilities:
    """The `Capabilities` of the registered model `name` (KeyError if unknown)."""
    get(name)
    return _CAPABILITIES[name]


def size_multiple(name, options) -> int:
    """The multiple the input side of model `name`, built with `options`, must be."""
    multiple = capabilities(name).size_multiple
    if isinstance(multiple, str):
        default = inspect.signature(get(name)).parameters[multiple].default
        return 2 ** int(options.get(multiple, default))
    return int(multiple)


def names(task=None):
    """Registered model names, all or those of one `task` (`segment`, `classify`, ...)."""
    _load_builtin()
    return tuple(sorted(n for n in _BUILDERS if task is None or _CAPABILITIES[n].task == task))


def get(name):
    _load_builtin()
    if name not in _BUILDERS:
        raise KeyError(
            f"Unknown model `{name}`. Registered models: {', '.join(names())}."
        )
    return _BUILDERS[name]


def build(name, **kwargs):
    return get(name)(**kwargs)


def accepted_options(name, options):
    """The subset of `options` that the builder `name` takes as keyword arguments.

    The `[model]` table holds the options of every model; each builder gets
    only its own (a ResNet U-Net has no `depth`, a U-Net no `encoder_weights`).
    """
    params = inspect.signature(get(name)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _load_builtin():
    # Importing the builder modules runs their @register decorators; the
    # package is scanned, so a new model is one new file.
    for info in pkgutil.iter_modules(_package_path()):
        importlib.import_module(f"{__package__}.{info.name}")


def _package_path():
    return [str(Path(__file__).parent)]
