"""Regression tests for the two CPU-stack fixes (serving/cpu_fixes.py), each run in a fresh process."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from serving import cpu_fixes


def _run(code: str, env_extra: dict | None = None) -> str:
    import os

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_plugins_are_registered_with_vllm():
    general = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert general.get("heteroscale_cpu_fixes") == "serving.cpu_fixes:register"
    stats = {e.name: e.value for e in entry_points(group="vllm.stat_logger_plugins")}
    assert stats.get("heteroscale_engine_stats") == "serving.engine_stats:EngineStatsLogger"


IDLE_AGENT = """
    import time
    from serving import cpu_fixes
    if {patch}:
        cpu_fixes.register()          # what vLLM runs in every engine process
    from nixl._api import nixl_agent
    agent = nixl_agent("probe")
    t0 = time.process_time(); time.sleep(1.5)
    print(time.process_time() - t0)
"""


def test_nixl_progress_thread_no_longer_spins():
    """Bug: nixl hard-codes the UCX progress thread's poll delay to 0, so an idle agent burns a full core."""
    spinning = float(_run(IDLE_AGENT.format(patch=False)))
    fixed = float(_run(IDLE_AGENT.format(patch=True), {"HETEROSCALE_CPU_FIXES": "1"}))
    assert spinning > 0.7, f"the unpatched agent should spin (used {spinning:.2f}s CPU in 1.5s idle)"
    assert fixed < 0.3, f"the patched agent still used {fixed:.2f}s CPU in 1.5s idle"


def test_nixl_patch_is_idempotent_and_validates():
    first = cpu_fixes.patch_nixl_progress_delay(500)
    again = cpu_fixes.patch_nixl_progress_delay(1000)
    assert first == again and first
    import importlib

    module = importlib.import_module(first[0])
    assert module.nixlBind._delay_us == 1000 and not isinstance(module.nixlBind._real,
                                                                  cpu_fixes._NixlBindingsWithDelay)
    with pytest.raises(ValueError, match=r"HETEROSCALE_NIXL_PROGRESS_DELAY_US \(-1\)"):
        cpu_fixes.patch_nixl_progress_delay(-1)


def test_fixes_switch_off_and_reject_bad_flag(monkeypatch):
    monkeypatch.setenv(cpu_fixes.ENV_ENABLE, "0")
    assert cpu_fixes._fixes_wanted() is False
    monkeypatch.setenv(cpu_fixes.ENV_ENABLE, "yes")
    with pytest.raises(ValueError, match="HETEROSCALE_CPU_FIXES \\('yes'\\)"):
        cpu_fixes._fixes_wanted()
    monkeypatch.delenv(cpu_fixes.ENV_ENABLE)
    assert cpu_fixes._fixes_wanted() is True  # this machine's vLLM platform is CPU


AMX_PROBE = """
    from serving import cpu_fixes
    before = cpu_fixes.amx_permitted()
    cpu_fixes.register()
    print(before, cpu_fixes.amx_permitted())
"""


def _cpu_has_amx() -> bool:
    try:
        return " amx_tile" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_amx(), reason="this CPU has no AMX (the SIGILL cannot happen here)")
def test_amx_permission_is_requested_in_a_fresh_process():
    """Bug: vLLM-CPU's AMX attention kernel faults (SIGILL) unless the process asked Linux for AMX tile data."""
    before, after = _run(AMX_PROBE, {"HETEROSCALE_CPU_FIXES": "1"}).split()
    assert before == "False" and after == "True"


def test_amx_request_is_harmless_without_amx():
    if _cpu_has_amx():
        pytest.skip("covered by test_amx_permission_is_requested_in_a_fresh_process")
    assert cpu_fixes.request_amx_permission() is False
    assert cpu_fixes.amx_permitted() in (False, None)
