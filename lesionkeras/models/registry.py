"""Model registry: later methods add their architectures by name.

Example:

```python
@register("unet")
def build_unet(input_shape=(None, None, 3), **kwargs): ...

model = build("unet", input_shape=(64, 64, 3), filters=8)
```
"""

_BUILDERS = {}
# The ISIC task of each model (`segment` unless registered for another, see `register`).
_TASKS = {}


def register(name, task="segment"):
    """Decorator registering a builder `f(input_shape, out_channels, **options)`.

    Models of the other ISIC tasks (`task="classify"`, `"attributes"`) take their
    own arguments (e.g. `num_classes`) and are trained by their task's runner.
    """

    def wrap(fn):
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"Model `{name}` is already registered.")
        _BUILDERS[name] = fn
        _TASKS[name] = task
        return fn

    return wrap


def names(task=None):
    """Registered model names, all or those of one `task` (`segment`, `classify`, ...)."""
    _load_builtin()
    return tuple(sorted(n for n in _BUILDERS if task is None or _TASKS[n] == task))


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
    import inspect

    params = inspect.signature(get(name)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _load_builtin():
    # Importing the builder modules runs their @register decorators.
    from lesionkeras.models import resnet_unet, unet  # noqa: F401
    from lesionkeras.models import segan  # noqa: F401
    from lesionkeras.models import deeplab  # noqa: F401
    from lesionkeras.models import vgg_se_unet  # noqa: F401
    # ISIC 2018 Task 3 classifier and Task 2 multitask attribute network (issue 8).
    from lesionkeras.models import attribute_net, resnet_classifier  # noqa: F401
