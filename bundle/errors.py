"""Make the bundle's own error the last line of an uncaught traceback.

``monai.bundle`` wraps an exception raised while it evaluates a ``$`` expression or instantiates a component in
``RuntimeError("Failed to evaluate ConfigExpression: ...")`` / ``"Failed to instantiate component ..."``, and MONAI's
transforms wrap theirs in ``RuntimeError("applying transform ...")``; the traceback then ends with the wrapper,
and the message that says what is wrong (a checkpoint of another size, a missing file, a bad label) sits far up
the chain. :func:`install_excepthook` (run on ``import bundle``, so by every bundle config) keeps Python's report
and appends the innermost cause as the last line.
"""

from __future__ import annotations

import os
import sys

_MARK = "_sampo_root_cause_hook"


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bundle/ and scripts/ live here


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (explicit ``__cause__``, else unsuppressed ``__context__``)."""
    out, seen = [exc], {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return out
        seen.add(id(nxt))
        out.append(nxt)
        exc = nxt


def _raised_by_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(PACKAGE_ROOT + os.sep) and os.sep + "site-packages" + os.sep not in path


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain raised by this project's code (its message says what is wrong in
    the bundle's terms), else the innermost one."""
    chain = _chain(exc)
    ours = [e for e in chain if _raised_by_project(e)]
    return ours[-1] if ours else chain[-1]


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
