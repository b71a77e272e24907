"""The CLI's console: our lines, libraries' errors; every record in the log file."""

import logging

from heteroscale_ray import console


def test_libraries_log_to_the_file_and_only_their_errors_reach_the_console(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HETEROSCALE_LOG_DIR", str(tmp_path))
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    lib = logging.getLogger("ray.llm._internal.serve")
    lib_handler = logging.StreamHandler()  # what ray.llm does: a console handler of its own
    lib.addHandler(lib_handler)
    lib.propagate = False
    ours = logging.getLogger("autoscaler.controller")
    levels = lib.level, ours.level
    lib.setLevel(logging.INFO)  # other tests (and `service.connect`) may have raised these loggers' levels
    ours.setLevel(logging.INFO)
    try:
        path = console.setup(verbose=False)
        console.route_library_logs()
        assert lib_handler not in lib.handlers and lib.propagate
        lib.info('{"deployment_config": "..."}')
        lib.warning("Triton not found")
        lib.error("engine failed to start")
        ours.warning("probe failed")
        ours.info("tick")
        for h in logging.getLogger().handlers:
            h.flush()
        err = capsys.readouterr().err
        assert "engine failed to start" in err and "probe failed" in err
        assert "Triton" not in err and "deployment_config" not in err and "tick" not in err
        text = path.read_text()
        assert all(s in text for s in ("deployment_config", "Triton", "engine failed", "probe failed", "tick"))
    finally:
        root = logging.getLogger()
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        lib.propagate = True
        lib.setLevel(levels[0])
        ours.setLevel(levels[1])
