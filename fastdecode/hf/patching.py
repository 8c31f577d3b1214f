"""``fastdecode.patch`` / ``unpatch``: make ``model.generate`` run :func:`fastdecode.generate`.

The patched ``generate`` is a :class:`PatchedGenerate` stored on the instance, which behaves like a
bound method: it holds the model as ``__self__`` and takes ``model.generate``'s exact signature.
Because it refers to the model as an attribute (not through a closure), ``copy.deepcopy`` and
pickling carry it to the copy, which then generates with its own weights.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional


class PatchedGenerate:
    """``model.generate`` of a patched model. previous: the instance's own ``generate`` before
    patching (None when it was the class's), restored by :func:`unpatch`."""

    __name__ = "generate"

    def __init__(self, model, previous: Optional[Any]):
        self.__self__ = model
        self.previous = previous

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(original_generate(self.__self__))

    def __call__(self, *args, **kwargs):
        from fastdecode.hf.generate import generate

        model = self.__self__
        signature = self.__signature__
        arguments = signature.bind(*args, **kwargs).arguments  # TypeError as model.generate
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return generate(model, **arguments)

    def __repr__(self) -> str:
        return f"<fastdecode generate of {type(self.__self__).__name__}>"


def original_generate(model):
    """The model's own ``generate`` (bound), also while the model is patched."""
    entry = model.__dict__.get("generate")
    if isinstance(entry, PatchedGenerate):
        entry = entry.previous
    return entry if entry is not None else type(model).generate.__get__(model)


def patch(model):
    """Make ``model.generate`` run :func:`fastdecode.generate`; returns the model. Idempotent."""
    if not isinstance(model.__dict__.get("generate"), PatchedGenerate):
        model.__dict__["generate"] = PatchedGenerate(model, model.__dict__.get("generate"))
    return model


def unpatch(model):
    """Undo :func:`patch` exactly (no-op on a model that is not patched); returns the model."""
    entry = model.__dict__.get("generate")
    if isinstance(entry, PatchedGenerate):
        if entry.previous is None:
            del model.__dict__["generate"]
        else:
            model.__dict__["generate"] = entry.previous
    return model
