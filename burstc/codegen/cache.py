"""The kernels, loaded once per execution mode: compiled (GPU) or interpreted (TRITON_INTERPRET, CPU).

`@triton.jit` decides at decoration time whether it makes a compiled or an interpreted function,
from the TRITON_INTERPRET setting of that moment. Whoever imports kernels.py first would fix the
mode for the whole process, so instead each mode gets its own copy of the module, executed with the
interpreter knob set as asked. Triton's own @jit library functions (tl.max, tl.sum, tl.zeros...)
have the same problem; `stdlib_mode` swaps in twins of the right mode around a launch or compile.
Compiled binaries are cached by Triton itself, keyed by the arguments' types and the spec's
constexprs (see `KernelSpec.constexprs`): the mask kind is the MASK constexpr, a mask's dtype is its
pointer's type, and without a mask the mask arguments are None, hence constexprs too.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import triton

KERNELS_FILE = Path(__file__).with_name("kernels.py")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter now (TRITON_INTERPRET=1 or the knob)."""
    return bool(triton.knobs.runtime.interpret)


def kernel_module(interpret: bool) -> ModuleType:
    """burstc/codegen/kernels.py with its @triton.jit functions in the requested mode."""
    name = "burstc.codegen._kernels_" + ("interpreted" if interpret else "compiled")
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = interpret
                spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def kernel(kind: str, interpret: bool):
    """The jitted kernel of a `KernelSpec.kind` in the requested mode."""
    return getattr(kernel_module(interpret), kind + "_kernel")


@functools.cache
def _twin(fn, interpret: bool):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return InterpretedFunction(fn) if interpret else JITFunction(fn)


@contextlib.contextmanager
def stdlib_mode(interpret: bool):
    """While inside, triton.language's own @jit functions are in the requested mode.

    They were decorated when triton.language was imported, in the TRITON_INTERPRET mode of that
    moment; a compiled one refuses to be called from interpreted code, an interpreted one cannot be
    compiled. A no-op when the import already chose the requested mode. Interpreted, it also undoes
    the interpreter's patches of triton.language on the way out (`_restoring_language`)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrong_kind = JITFunction if interpret else InterpretedFunction
    swapped = []
    for name, module in list(sys.modules.items()):
        if name.startswith("triton.language") and module is not None:
            for attr, value in list(vars(module).items()):
                if isinstance(value, wrong_kind):
                    swapped.append((module, attr, value))
                    setattr(module, attr, _twin(value.fn, interpret))
    try:
        with _restoring_language() if interpret else contextlib.nullcontext():
            yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


@contextlib.contextmanager
def _restoring_language():
    """Put back every attribute the interpreter patches in triton.language while inside.

    The interpreter swaps the language's builtins for numpy versions around each call, but a call of
    one @jit function from another (tl.max, our helpers) never restores its swaps: afterwards
    triton.language would stay half-interpreted and a later compile in this process would fail."""
    from triton.runtime import interpreter

    scope_class = getattr(interpreter, "_LangPatchScope", None)
    if scope_class is None:  # another Triton version: nothing known to undo
        yield
        return
    originals = {}
    set_attr = scope_class.set_attr

    def recording_set_attr(scope, obj, name, value):
        originals.setdefault((id(obj), name), (obj, name, getattr(obj, name, interpreter._MISSING)))
        set_attr(scope, obj, name, value)

    scope_class.set_attr = recording_set_attr
    try:
        yield
    finally:
        scope_class.set_attr = set_attr
        for obj, name, original in originals.values():
            if original is interpreter._MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, original)
