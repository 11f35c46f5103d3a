"""Make the bundle's own error the last line of an uncaught traceback.

``monai.bundle`` wraps an exception raised while it evaluates a ``$`` expression or instantiates a component in
``RuntimeError("Failed to evaluate ConfigExpression: ...")`` / ``"Failed to instantiate component ..."``, and MONAI's
transforms wrap theirs in ``RuntimeError("applying transform ...")``; the traceback then ends with the wrapper,
and the message that says what is wrong (a checkpoint of another size, a missing file, a bad label) sits far up
the chain. :func:`install_excepthook` (run on ``import bundle``, so by every bundle config) keeps Python's report
and appends the innermost cause as the last line.
"""

from __future__ import annotations

import sys

_MARK = "_sampo_root_cause_hook"


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain (explicit ``__cause__`` first, then unsuppressed context)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _hook(previous):
    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if exc is None or isinstance(exc, KeyboardInterrupt):
            return
        root = root_cause(exc)
        if root is not exc:
            sys.stderr.write(
                f"\nThe error above was raised by (innermost cause):\n{type(root).__name__}: {root}\n"
            )
            sys.stderr.flush()

    setattr(hook, _MARK, True)
    return hook


def install_excepthook() -> None:
    """Wrap ``sys.excepthook`` once (only the interpreter's default one, not IPython's or a debugger's)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _hook(sys.excepthook)
