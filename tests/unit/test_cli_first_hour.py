"""The first hour with the ``clickpulse`` command: --version, help on every option, and one-line
``clickpulse: error: ...`` messages (no traceback) with a documented exit code for each kind of
failure. No broker is needed: "Kafka unreachable" is a loopback port nothing listens on."""

from __future__ import annotations

import argparse
import errno
import io
import os
import re
import socket
import subprocess
import sys
import tokenize
from importlib.metadata import version
from pathlib import Path

import pytest

from clickpulse.cli import EXIT_BUG, EXIT_INVALID, EXIT_UNAVAILABLE, build_parser, error_exit, main
from clickpulse.errors import ConfigError, DatasetError, ServiceError
from clickpulse.runtime import REPO_ROOT

SRC = REPO_ROOT / "src"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLICKPULSE_")}
    full["PYTHONPATH"] = str(SRC) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "clickpulse.cli", *args], env=full, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clickpulse: error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert res.returncode == code, (res.returncode, err)
    return lines[0]


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"clickpulse {version('clickpulse')}"


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_option_and_subcommand_has_help():
    missing = []
    commands = 0
    for path, parser in _walk(build_parser()):
        commands += 1
        for action in parser._actions:  # noqa: SLF001
            if isinstance(action, argparse._HelpAction):  # noqa: SLF001
                continue
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                helps = {a.dest: a.help for a in action._choices_actions}  # noqa: SLF001
                missing += [f"{' '.join(path)} {name} (subcommand)" for name in action.choices if not helps.get(name)]
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path) or 'clickpulse'} {'/'.join(action.option_strings) or action.dest}")
    assert commands >= 20, commands  # the walk really descends into the subcommands
    assert not missing, f"options without help text: {missing}"


@pytest.mark.parametrize("argv", [["--log-level", "foo", "rules", "check"], ["worker", "--loglevel", "loud"],
                                  ["trainer", "--loglevel", "verbose"]])
def test_unknown_log_level_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "clickpulse" in err and "error: argument" in err and "unknown log level" in err
    assert "Traceback" not in err


def test_log_level_is_case_insensitive(capsys):
    assert main(["--log-level", "DEBUG", "rules", "check"]) == 0


# every subcommand that talks to Kafka, with what it needs to get as far as Kafka
KAFKA_COMMANDS = [
    ["worker"], ["trainer"], ["replay", "--format", "rees46", "src/clickpulse/data/rees46-2019-oct-sample.csv"],
    ["quarantine", "list"], ["quarantine", "show", "u1"], ["privacy", "erase", "u1", "--timeout", "5"],
    ["privacy", "export", "u1"], ["deliver", "--sink", "jsonl", "--out", "{tmp}/out.jsonl"],
    ["demo", "--no-services", "--out-dir", "{tmp}/demo"], ["topics", "list"], ["topics", "clean", "--namespace", "x"],
    ["topics", "clean", "--namespace", "x", "--yes"],
]


@pytest.mark.parametrize("argv", KAFKA_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_kafka_unreachable_is_one_line_exit_3(argv, tmp_path):
    port = closed_port()
    res = run_cli(*[a.format(tmp=tmp_path) for a in argv], cwd=REPO_ROOT,
                  env={"CLICKPULSE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "CLICKPULSE_DATA_DIR": str(tmp_path / "d"),
                       "CLICKPULSE_WEB_PORT": str(closed_port()), "CLICKPULSE_TRAINER_WEB_PORT": str(closed_port()),
                       "CLICKPULSE_SNAPSHOT_KEY": "k" * 32})
    assert_one_line_error(res, EXIT_UNAVAILABLE, "Kafka is not reachable at", f"127.0.0.1:{port}",
                          "CLICKPULSE_KAFKA_BOOTSTRAP")


@pytest.mark.parametrize("argv,var", [(["worker"], "CLICKPULSE_WEB_PORT"), (["trainer"], "CLICKPULSE_TRAINER_WEB_PORT"),
                                      (["deliver", "--sink", "jsonl", "--out", "x", "--metrics-port", "{port}"],
                                       "--metrics-port"),
                                      (["collector"], "--port or CLICKPULSE_COLLECTOR_PORT"),
                                      (["collector", "--port", "{port}"], "--port or CLICKPULSE_COLLECTOR_PORT"),
                                      (["api"], "--port or CLICKPULSE_API_PORT")])
def test_port_in_use_is_one_line_naming_the_setting(argv, var, monkeypatch, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("CLICKPULSE_KAFKA_BOOTSTRAP", f"127.0.0.1:{closed_port()}")  # never reached
        for name in ("CLICKPULSE_WEB_PORT", "CLICKPULSE_TRAINER_WEB_PORT", "CLICKPULSE_COLLECTOR_PORT",
                     "CLICKPULSE_API_PORT"):
            if name in var:
                monkeypatch.setenv(name, str(port))
        assert main([a.format(port=port) for a in argv]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err.strip()
    assert err == f"clickpulse: error: port {port} on 127.0.0.1 is already in use (another clickpulse process?); " \
                  f"choose another with {var}"


@pytest.mark.parametrize("env,fragment", [
    ({"CLICKPULSE_REDIS_URL": "127.0.0.1:6379"}, "CLICKPULSE_REDIS_URL must be a URL such as redis://"),
    ({"CLICKPULSE_MODELS_ENABLED": "ture"}, "CLICKPULSE_MODELS_ENABLED='ture' is not a boolean"),
    ({"CLICKPULSE_KAFKA_BOOTSTRAP": "kafka://127.0.0.1:9092"}, "CLICKPULSE_KAFKA_BOOTSTRAP must be host:port"),
    ({"CLICKPULSE_PARTITIONS": "four"}, "CLICKPULSE_PARTITIONS='four' is not a valid int"),
    ({"CLICKPULSE_WEB_PORT": "70000"}, "CLICKPULSE_WEB_PORT must be a TCP port"),
])
def test_bad_settings_are_one_line_exit_2(env, fragment):
    res = run_cli("topics", "list", env=env)
    assert_one_line_error(res, EXIT_INVALID, fragment)


def test_unreadable_rules_file_is_one_line(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("version: '1'\n")
    f.chmod(0)
    if os.access(f, os.R_OK):  # root reads anything: use a directory instead
        f = tmp_path
    res = run_cli("rules", "check", str(f))
    assert_one_line_error(res, EXIT_INVALID, str(f))
    assert_one_line_error(run_cli("rules", "check", str(tmp_path / "missing.yaml")), EXIT_INVALID, "missing.yaml")


@pytest.mark.parametrize("err,code,fragment", [
    (ServiceError("Redis down"), EXIT_UNAVAILABLE, "Redis down"),
    (ConfigError("CLICKPULSE_X bad"), EXIT_INVALID, "CLICKPULSE_X bad"),
    (DatasetError("no such file: a.csv"), EXIT_INVALID, "no such file"),
    (OSError(errno.EADDRINUSE, "Address already in use"), EXIT_UNAVAILABLE, "a port is already in use"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/out.jsonl"), EXIT_INVALID,
     "/x/out.jsonl: No such file or directory"),
    (KeyError("boom"), EXIT_BUG, "unexpected KeyError: 'boom' (a bug; CLICKPULSE_DEBUG=1 shows the traceback)"),
])
def test_error_exit_maps_each_kind(err, code, fragment):
    message, got = error_exit(err)
    assert got == code and fragment in message and "\n" not in message


def test_library_connection_errors_are_service_errors():
    import redis
    from aiokafka.errors import KafkaConnectionError
    msg, code = error_exit(KafkaConnectionError("Unable to bootstrap from [('h', 1)]"))
    assert code == EXIT_UNAVAILABLE and msg.startswith("Kafka is not reachable at ")
    msg, code = error_exit(redis.ConnectionError("Error 111 connecting to 127.0.0.1:1"))
    assert code == EXIT_UNAVAILABLE and msg.startswith("Redis is not reachable (CLICKPULSE_REDIS_URL)")


def _boom(_args: argparse.Namespace) -> int:
    raise ZeroDivisionError("division by zero")


def test_a_new_subcommand_inherits_the_error_handling(monkeypatch, capsys):
    """A subcommand added later (another module's ``set_defaults(func=...)``) gets the one-line
    message, and CLICKPULSE_DEBUG=1 gives the traceback instead."""
    real = build_parser

    def parser_with_new_command() -> argparse.ArgumentParser:
        p = real()
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        sub.add_parser("boom", help="fails").set_defaults(func=_boom)
        return p
    monkeypatch.setattr("clickpulse.cli.build_parser", parser_with_new_command)
    monkeypatch.delenv("CLICKPULSE_DEBUG", raising=False)
    assert main(["boom"]) == EXIT_BUG
    assert capsys.readouterr().err.strip() == ("clickpulse: error: unexpected ZeroDivisionError: division by zero "
                                               "(a bug; CLICKPULSE_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("CLICKPULSE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["boom"])


def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    res = run_cli("replay", "--format", "rees46", str(tmp_path / "nope.csv"), env={"CLICKPULSE_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr and "DatasetError" in res.stderr


# ---- messages that were never formatted (CLICKPULSE_PARTITIONS=8 printed a literal "{have}") ----

PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\]|\.[A-Za-z_]+)*(![rsa])?(:[^{}\s]*)?\}")


def unformatted_pieces(source: str) -> list[tuple[int, str]]:
    """Plain (non-f) string pieces that contain a ``{name}`` placeholder and are implicitly
    concatenated with an f-string piece: the f prefix was forgotten on that line."""
    out = []
    group: list[tokenize.TokenInfo] = []
    for tok in [*tokenize.generate_tokens(io.StringIO(source).readline), None]:
        if tok is not None and tok.type == tokenize.STRING:
            group.append(tok)
            continue
        if tok is not None and tok.type in (tokenize.NL, tokenize.COMMENT):
            continue
        prefixes = [re.match(r"[A-Za-z]*", t.string).group().lower() for t in group]
        if any("f" in p for p in prefixes):
            out += [(t.start[0], t.string) for t, p in zip(group, prefixes, strict=True)
                    if "f" not in p and PLACEHOLDER.search(t.string)]
        group = []
    return out


def test_the_checker_finds_the_old_bug():
    old = ('raise ConfigError(\n    f"topic {t} has {have} partitions; "\n'
           '    "(set CLICKPULSE_PARTITIONS={have})")\n')
    assert unformatted_pieces(old) == [(3, '"(set CLICKPULSE_PARTITIONS={have})"')]
    assert unformatted_pieces('x = f"{a}" "no placeholder"\ny = "{name}".format(name=1)\n') == []


def test_no_string_piece_lost_its_f_prefix():
    found = []
    for folder in ("src", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(REPO_ROOT)}:{line}: {text}"
                      for line, text in unformatted_pieces(path.read_text())]
    assert not found, "\n".join(found)


# ---- progress on long steps --------------------------------------------------------------------


def test_progress_prints_count_and_rate_at_most_every_interval():
    from clickpulse.runtime import Progress
    now = [100.0]
    out = io.StringIO()
    prog = Progress(range(10_000), "replay x.csv", every_s=2.0, out=out, clock=lambda: now[0])
    seen = 0
    for _ in prog:
        seen += 1
        now[0] += 0.001  # 1,000 records per second
    prog.done()
    lines = out.getvalue().splitlines()
    assert seen == 10_000
    # a line about every 2 s of the 10 s run, then the final one
    assert 4 <= len(lines) <= 6, lines
    assert lines[-1] == "replay x.csv: 10,000 records (1,000/s, 10 s)"
    # a paced replay (a few records a second): a line as soon as 2 s have passed, not 256 records
    # later (a newcomer saw nothing for two minutes of `replay --speed 60`)
    out2 = io.StringIO()
    slow = Progress(range(20), "replay slow", every_s=2.0, out=out2, clock=lambda: now[0])
    for _ in slow:
        now[0] += 0.5  # 2 records per second
    assert len(out2.getvalue().splitlines()) >= 4, out2.getvalue()
    assert Progress([1], "quiet", every_s=0, out=out).done() is None and "quiet" not in out.getvalue()


def test_replay_prints_progress_to_stderr(monkeypatch, tmp_path, capsys):
    """The CLI wires the progress into replay (the publisher is replaced: no broker here)."""
    import clickpulse.cli as cli
    from clickpulse.ingest.replay import ReplayResult

    async def fake_publish(_bootstrap, _topic, records, **_kw):
        n = sum(1 for _ in records)
        return ReplayResult(n, None, None, 0.1, False)

    async def no_topics(_s):
        return None
    monkeypatch.setattr(cli, "publish", fake_publish)
    monkeypatch.setattr(cli, "ensure_topics", no_topics)
    f = tmp_path / "e.jsonl"
    f.write_text('{"type":"page_view","user_id":"u1","timestamp":1569888000000}\n' * 600)
    assert main(["replay", "--format", "jsonl", str(f), "--progress-s", "0.000001"]) == 0
    cap = capsys.readouterr()
    assert "published 600 records" in cap.out
    assert cap.err.strip().splitlines()[-1].startswith("replay e.jsonl: 600 records (")
    assert main(["replay", "--format", "jsonl", str(f), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ---- README, Makefile and LICENSE agree with the package ---------------------------------------


def _python_bounds() -> tuple[tuple[int, int], tuple[int, int]]:
    import tomllib
    spec = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    lo = re.search(r">=\s*(\d+)\.(\d+)", spec)
    hi = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert lo and hi, spec
    return (int(lo[1]), int(lo[2])), (int(hi[1]), int(hi[2]))


def test_python_versions_agree_with_requires_python():
    (lo_major, lo_minor), (hi_major, hi_minor) = _python_bounds()
    assert lo_major == hi_major == 3
    versions = [f"3.{m}" for m in range(lo_minor, hi_minor)]
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"Python {' or '.join(versions)}" in readme if len(versions) == 2 else all(v in readme for v in versions)
    assert "Python ≥" not in readme and "Python >=" not in readme
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"(3, {lo_minor}) <= sys.version_info[:2] < (3, {hi_minor})" in makefile


def test_readme_cites_only_what_is_in_the_repository():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "SCENARIOS" not in readme
    assert not re.findall(r"(?i)\bissues? #\d+|(?<![\w/])#\d+\b", readme)
    for path in re.findall(r"\]\(([^)#:]+)\)", readme):  # relative links point at files that exist
        assert (REPO_ROOT / path).exists(), path


def test_readme_lists_every_port():
    from clickpulse.settings import OTHER_ENV_VARS, Settings
    readme = (REPO_ROOT / "README.md").read_text()
    ports = readme[readme.index("**Ports.**"):]
    ports = ports[:ports.index("\n\n")]
    s = Settings()
    for port in (OTHER_ENV_VARS["CLICKPULSE_KAFKA_PORT"][0], OTHER_ENV_VARS["CLICKPULSE_KAFKA_CONTROLLER_PORT"][0],
                 OTHER_ENV_VARS["CLICKPULSE_REDIS_PORT"][0], str(s.web_port), str(s.trainer_web_port)):
        assert port in ports, port
    assert "--metrics-port" in ports and "own setting" in ports


def test_license_is_the_apache_2_text_the_package_declares():
    import tomllib
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text
    assert len(text) > 11_000


def test_long_running_commands_log_a_lost_broker_again(monkeypatch):
    """At the default level aiokafka's refused-connection records are dropped while a command
    starts (its own error says it once); a long-running command that reached Kafka logs them again."""
    import logging

    import clickpulse.cli as cli
    import clickpulse.delivery as delivery
    seen = {}

    async def answers(_s):
        seen["filtered_at_start"] = cli._quiet_refused_connections in logging.getLogger("aiokafka").filters

    def fake_run_cli(*_a, **_kw):
        seen["filtered_while_running"] = cli._quiet_refused_connections in logging.getLogger("aiokafka").filters
        return 0
    monkeypatch.setattr(cli, "_kafka_answers", answers)
    monkeypatch.setattr(delivery, "run_cli", fake_run_cli)
    try:
        assert main(["deliver", "--sink", "jsonl", "--out", "x.jsonl"]) == 0
    finally:
        logging.getLogger("aiokafka").removeFilter(cli._quiet_refused_connections)
    assert seen == {"filtered_at_start": True, "filtered_while_running": False}


@pytest.mark.parametrize("argv", [["collector", "--port", "99999"], ["api", "--port", "99999"], ["api", "--port", "-5"],
                                  ["collector", "--port", "0"], ["deliver", "--sink", "jsonl", "--out", "x",
                                                                 "--metrics-port", "70000"]])
def test_a_port_flag_out_of_range_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "is not a TCP port (1..65535)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,var", [(["collector"], "CLICKPULSE_COLLECTOR_PORT"), (["api"], "CLICKPULSE_API_PORT")])
def test_a_port_setting_out_of_range_is_one_line_exit_2(argv, var, monkeypatch, capsys):
    monkeypatch.setenv(var, "99999")
    assert main(argv) == EXIT_INVALID
    assert capsys.readouterr().err.strip() == f"clickpulse: error: {var} must be a TCP port in 1..65535, got 99999"


@pytest.mark.parametrize("cmd,port", [("collector", 8088), ("api", 6068)])
def test_an_address_that_cannot_be_bound_is_one_line_exit_2(cmd, port, monkeypatch, capsys):
    monkeypatch.setenv("CLICKPULSE_KAFKA_BOOTSTRAP", f"127.0.0.1:{closed_port()}")  # never reached
    assert main([cmd, "--host", "999.1.1.1"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"clickpulse: error: port {port} on 999.1.1.1 cannot be bound: ") and "--host/--port" in err


def test_topics_clean_needs_an_explicit_namespace(monkeypatch, capsys):
    monkeypatch.setenv("CLICKPULSE_NAMESPACE", "mine")
    with pytest.raises(SystemExit) as exc:
        main(["topics", "clean", "--yes"])
    assert exc.value.code == 2 and "--namespace" in capsys.readouterr().err
