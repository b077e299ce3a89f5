"""Changes to torch and megatron-core that are applied together and undone together.

An ``Adaptation`` replaces attributes of other packages' modules and classes (a function, a class's
method, a module global) and can enter contexts (a torch function mode); ``undo`` puts every
original back, last change first, so that the packages are as they were before ``apply``. Use it as
a context manager, or call ``apply()`` and ``undo()`` around a longer scope: ``initialize_parallel``
applies the project's adaptations and ``destroy_parallel`` undoes them.
"""

from __future__ import annotations

import contextlib

_ABSENT = object()


class Adaptation:
    """A set of changes to other packages; subclasses list them in ``_adapt``."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    @property
    def applied(self) -> bool:
        return self._stack is not None

    def apply(self) -> Adaptation:
        """Make every change of ``_adapt``; if one fails, those made already are undone."""
        if self._stack is not None:
            raise RuntimeError(f"{type(self).__name__} is applied already")
        with contextlib.ExitStack() as stack:
            self._adapt(stack)
            self._stack = stack.pop_all()
        return self

    def undo(self) -> None:
        """Put back what ``apply`` changed, last change first."""
        stack, self._stack = self._stack, None
        if stack is None:
            raise RuntimeError(f"{type(self).__name__} is not applied")
        stack.close()

    def __enter__(self) -> Adaptation:
        return self.apply()

    def __exit__(self, *exception) -> None:
        self.undo()

    def _adapt(self, stack: contextlib.ExitStack) -> None:
        raise NotImplementedError


def replace(stack: contextlib.ExitStack, owner: object, name: str, value: object) -> None:
    """Set ``owner.name = value`` until ``stack`` closes."""
    keep(stack, owner, name)
    setattr(owner, name, value)


def keep(stack: contextlib.ExitStack, owner: object, name: str) -> None:
    """Restore ``owner.name`` (as ``owner`` itself holds it: a class's raw descriptor, a module's
    global, or its absence) when ``stack`` closes, whatever changes it meanwhile."""
    original = vars(owner).get(name, _ABSENT)
    stack.callback(_restore, owner, name, original)


def _restore(owner: object, name: str, original: object) -> None:
    if original is _ABSENT:
        if name in vars(owner):
            delattr(owner, name)
    else:
        setattr(owner, name, original)
