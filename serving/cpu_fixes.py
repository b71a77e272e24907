"""Fixes for vLLM-CPU + NIXL, applied in every vLLM process through the `vllm.general_plugins` entry point.

vLLM calls `register()` early in the engine-core process and in every worker process (and in the frontend).
Both fixes are active only on the CPU platform; on GPU clusters `register()` does nothing unless the
environment asks for a fix explicitly. See `docs/design.md` ("CPU stack fixes") for the evidence.

1. AMX permission. vLLM-CPU's AMX attention kernel executes AMX tile instructions without asking Linux for
   permission (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); unless oneDNN happened to ask first,
   the process dies with SIGILL (a P/D decode engine's first forward has one token, so it always dies).
2. NIXL progress thread. nixl's Python wrapper hard-codes the UCX progress thread's poll delay
   (`pthrDelay`) to 0, so every engine burns a whole core polling. We raise it (1,000 us by default).

Must not import Ray. Imports vLLM only inside `register()` (which vLLM itself calls).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import types

logger = logging.getLogger(__name__)

#: Linux x86_64 syscall number and arch_prctl codes (arch/x86/include/uapi/asm/prctl.h).
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

#: Env knobs. `HETEROSCALE_CPU_FIXES=0` switches both off (for reproducing the bugs); `=1` forces them on
#: any platform. `HETEROSCALE_NIXL_PROGRESS_DELAY_US` sets the progress-thread poll delay.
ENV_ENABLE = "HETEROSCALE_CPU_FIXES"
ENV_NIXL_DELAY_US = "HETEROSCALE_NIXL_PROGRESS_DELAY_US"
DEFAULT_NIXL_DELAY_US = 1000  # verified in shared/reference/cpu-stack.md; 0 is nixl's spin-forever default


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def amx_permitted() -> bool | None:
    """True if this process may use AMX tile data, False if not, None where the question does not apply."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    mask = ctypes.c_uint64(0)
    rc = _libc().syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
    if rc != 0:
        return None
    return bool(mask.value & (1 << _XFEATURE_XTILEDATA))


def request_amx_permission() -> bool:
    """Ask Linux for AMX tile-data permission for this process (inherited by its children). True on success."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = _libc()
    rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    if rc != 0:
        err = ctypes.get_errno()
        # EINVAL: the CPU or kernel has no AMX; nothing to fix then.
        logger.debug("arch_prctl(ARCH_REQ_XCOMP_PERM) failed: errno %d", err)
        return False
    return True


class _NixlBindingsWithDelay(types.ModuleType):
    """Stand-in for nixl's `nixlBind` module that sets the progress-thread delay on every new agent."""

    def __init__(self, real, delay_us: int):
        super().__init__(real.__name__)
        self._real = real
        self._delay_us = delay_us

    def __getattr__(self, name):
        return getattr(self._real, name)

    def nixlAgent(self, name, config):  # noqa: N802 - mirrors the binding's name
        config.pthrDelay = self._delay_us
        return self._real.nixlAgent(name, config)


def patch_nixl_progress_delay(delay_us: int) -> list[str]:
    """Make nixl agents created from now on poll with `delay_us` between progress-thread sweeps.

    Returns the nixl API modules patched (empty if nixl is not installed). Idempotent.
    """
    if delay_us < 0:
        raise ValueError(f"{ENV_NIXL_DELAY_US} ({delay_us}) must be >= 0 microseconds")
    # vLLM sets this before its own first nixl import; importing nixl here first must not lose it.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    import importlib

    patched = []
    for name in ("nixl_cu13._api", "nixl_cu12._api", "nixl_rocm._api"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = module.nixlBind
        real = current._real if isinstance(current, _NixlBindingsWithDelay) else current
        module.nixlBind = _NixlBindingsWithDelay(real, delay_us)
        patched.append(name)
    return patched


def _fixes_wanted() -> bool:
    flag = os.environ.get(ENV_ENABLE)
    if flag is not None:
        if flag not in ("0", "1"):
            raise ValueError(f"{ENV_ENABLE} ({flag!r}) must be '0' or '1'")
        return flag == "1"
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def register() -> None:
    """vLLM general-plugin entry point: apply the CPU fixes in this process. Safe to call repeatedly."""
    if not _fixes_wanted():
        return
    amx = request_amx_permission()
    delay_us = int(os.environ.get(ENV_NIXL_DELAY_US, DEFAULT_NIXL_DELAY_US))
    patched = patch_nixl_progress_delay(delay_us)
    logger.debug("heteroscale cpu fixes: amx=%s nixl_delay_us=%d patched=%s", amx, delay_us, patched)
