"""Model registry: later methods add their architectures by name.

Example:

```python
@register("unet")
def build_unet(input_shape=(None, None, 3), **kwargs): ...

model = build("unet", input_shape=(64, 64, 3), filters=8)
```
"""

_BUILDERS = {}


def register(name):
    """Decorator registering a builder `f(input_shape, out_channels, **options)`."""

    def wrap(fn):
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"Model `{name}` is already registered.")
        _BUILDERS[name] = fn
        return fn

    return wrap


def names():
    _load_builtin()
    return tuple(sorted(_BUILDERS))


def get(name):
    _load_builtin()
    if name not in _BUILDERS:
        raise KeyError(
            f"Unknown model `{name}`. Registered models: {', '.join(names())}."
        )
    return _BUILDERS[name]


def build(name, **kwargs):
    return get(name)(**kwargs)


def _load_builtin():
    # Importing the builder modules runs their @register decorators.
    from lesionkeras.models import unet  # noqa: F401
