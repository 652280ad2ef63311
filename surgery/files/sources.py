"""Model sources: how to rebuild the original (thin) model, so a checkpoint needs no pickled code.

A source is an import path `package.module:factory` called with JSON kwargs, or a Hugging Face
config (a directory holding config.json, or the json file itself). Checkpoints store it as JSON.
A factory named by a *file* is a call the file asks for, like a pickle: it is only made for
`nn.Module` classes and the torchvision / timm model zoos unless the source is trusted.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from surgery.errors import SurgeryError
from surgery.files.jsontext import parse_json

ZOOS = ("torchvision.models.", "timm.models.")  # factories a checkpoint may name without trust


class SourceError(SurgeryError, ValueError):
    """A model source could not be parsed, imported or built."""


@dataclass
class Source:
    """How to build the original model: `factory(**kwargs)`, or a Hugging Face `config`.

    `trusted`: the source comes from the user (command line, code), not from a file's metadata."""

    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    trusted: bool = field(default=True, compare=False)

    def build(self) -> nn.Module:
        """A fresh model in eval mode (random weights: load a state_dict into it)."""
        model = _build_hf(self.config) if self.config is not None else self._call_factory()
        return model.eval()

    def to_json(self) -> str:
        data = (
            {"factory": self.factory, "kwargs": self.kwargs}
            if self.factory is not None
            else {"config": self.config}
        )
        try:
            return json.dumps(data, sort_keys=True, separators=(",", ":"))
        except TypeError as error:
            raise SourceError(
                f"{self}: the kwargs must be JSON values to be stored ({error})"
            ) from None

    @classmethod
    def from_json(cls, text: str, *, trusted: bool = False) -> Source:
        try:
            data = parse_json(text)
            source = cls(data.get("factory"), data.get("kwargs") or {}, data.get("config"), trusted)
        except (ValueError, AttributeError, TypeError) as error:
            raise SourceError(f"the stored model source is not valid JSON ({error})") from None
        if set(data) - {"factory", "kwargs", "config"}:
            raise SourceError(f"the stored model source has unknown fields {sorted(set(data))}")
        if not (
            (source.factory is None or isinstance(source.factory, str))
            and isinstance(source.kwargs, dict)
            and all(isinstance(k, str) for k in source.kwargs)
            and (source.config is None or isinstance(source.config, dict))
        ):
            raise SourceError(
                "the stored model source must be a factory name with keyword arguments (an "
                "object) or a Hugging Face config (an object)"
            )
        if (source.factory is None) == (source.config is None):
            raise SourceError("the stored model source needs exactly one of factory and config")
        return source

    def __str__(self) -> str:
        if self.config is not None:
            arch = (self.config.get("architectures") or ["AutoModel"])[0]
            return f"Hugging Face {arch} ({self.config.get('model_type', '?')} config)"
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.factory}({args})"

    def _call_factory(self) -> nn.Module:
        if not self.trusted:
            _refuse_new_imports(self)
        factory = _resolve(self.factory or "")
        if not self.trusted and not _zoo_or_module(factory):
            raise SourceError(
                f"the file asks to call {self.factory}(**{self.kwargs}), which is neither an nn.Module "
                "class nor a torchvision/timm model: pass --trust-source (trust_source=True) if you "
                "trust the file, or give the model yourself"
            )
        try:
            model = factory(**self.kwargs)
        except Exception as error:  # noqa: BLE001 - the user's factory failing is bad input
            raise SourceError(f"{self}: {type(error).__name__}: {error}") from None
        if not isinstance(model, nn.Module):
            raise SourceError(f"{self.factory} returned {type(model).__name__}, not an nn.Module")
        return model


def source_of(spec: str, kwargs: dict[str, Any] | None = None) -> Source:
    """The source a user names: `package.module:factory` (with kwargs), or a Hugging Face config
    directory or json file."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        try:
            config = parse_json(path.read_text())
        except (OSError, ValueError) as error:
            raise SourceError(f"cannot read the Hugging Face config {path}: {error}") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise SourceError(f"{path} is not a Hugging Face config (it has no model_type)")
        return Source(config=config)
    module, colon, attr = spec.partition(":")
    if not colon and not path.exists() and path.suffix:
        raise SourceError(f"{spec} does not exist")
    if not colon or not module or not attr or path.exists():
        raise SourceError(
            f"MODEL {spec!r} is not an import path (package.module:factory), a Hugging Face config "
            "directory or json, or a checkpoint (.safetensors, *.safetensors.index.json, a directory)"
        )
    _resolve(spec)
    return Source(factory=spec, kwargs=dict(kwargs or {}))


def source_of_model(model: nn.Module) -> Source | None:
    """The source of a Hugging Face model instance (its config); None for any other model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(config, "model_type"):
        return None
    data = json.loads(config.to_json_string(use_diff=False))
    data["architectures"] = [type(model).__name__]
    return Source(config=data)


def _resolve(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise SourceError(f"cannot import {module_name!r} (from {spec!r}): {error}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SourceError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise SourceError(f"{spec!r} is not callable")
    return target


def _refuse_new_imports(source: Source) -> None:
    """An untrusted source may only name a module that is already imported or belongs to an
    installed model zoo (torchvision, timm): importing anything else would run its top-level code
    before we could refuse the factory."""
    module = (source.factory or "").partition(":")[0]
    if module in sys.modules or _installed_zoo(module):
        return
    raise SourceError(
        f"the file asks to import {module!r} to call {source.factory}, and importing runs that "
        "module's code: pass --trust-source (trust_source=True) if you trust the file, or import "
        "the module yourself / give the model yourself"
    )


def _installed_zoo(module: str) -> bool:
    """`module` is in torchvision.models / timm.models, and that package is not a file or folder of
    the same name in the working directory (finding a top-level spec imports nothing)."""
    if not (module + ".").startswith(ZOOS):
        return False
    top = module.partition(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    origin = Path(spec.origin).resolve()
    home = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    return home != Path.cwd().resolve()


def _zoo_or_module(factory: Any) -> bool:
    if isinstance(factory, type):
        return issubclass(factory, nn.Module)
    return inspect.isfunction(factory) and factory.__module__.startswith(ZOOS)


def _build_hf(config: dict[str, Any]) -> nn.Module:
    """A Hugging Face model from a config dict: the class its `architectures` names, else AutoModel;
    built with use_cache=False (capture needs it). Never runs remote code."""
    try:
        import transformers
    except ImportError:
        raise SourceError(
            "a Hugging Face config needs transformers: pip install transformers"
        ) from None
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as error:
        raise SourceError(f"not a usable Hugging Face config: {error}") from None
    if hasattr(hf_config, "use_cache"):
        hf_config.use_cache = False
    names = config.get("architectures") or []
    if not names:
        return transformers.AutoModel.from_config(hf_config)
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SourceError(
            f"the config's architecture {names[0]!r} is not a transformers model class"
        )
    return cls(hf_config)
