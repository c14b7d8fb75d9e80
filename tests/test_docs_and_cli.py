"""The README, docs, example config and --help say what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from dispatchd.config import Config, load_config
from dispatchd.core.lifecycle import State
from dispatchd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and \
                name != "auth":
            keys += _keys(annotation, f"{prefix}{name}.")
        elif name != "auth":
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_documented_and_in_the_example() -> None:
    """docs/configuration.md and deploy/dispatchd.example.toml list every key."""
    docs = (ROOT / "docs/configuration.md").read_text()
    example = (ROOT / "deploy/dispatchd.example.toml").read_text()
    for key in _keys(Config):
        section, name = key.split(".")
        assert f"`{name}`" in docs, f"{key} missing from docs/configuration.md"
        assert re.search(rf"^#? ?{name} = ", example, re.M), f"{key} missing from the example"
        assert f"[{section}]" in example


def test_example_config_is_the_defaults(tmp_path: Path) -> None:
    """The example file loads, and every value in it is the default."""
    config = load_config(ROOT / "deploy/dispatchd.example.toml")
    defaults = Config()
    for section in ("journal", "mqtt", "delivery", "websocket", "email", "webhook"):
        got = getattr(config, section).model_dump(exclude={"path"})
        assert got == getattr(defaults, section).model_dump(exclude={"path"}), section
    assert config.service.listen == defaults.service.listen


def test_every_state_and_metric_is_documented() -> None:
    docs = (ROOT / "docs/dispatch.md").read_text()
    for state in State:
        assert f"`{state.value}`" in docs, state
    metrics = Metrics()
    names = {m.name for m in metrics.registry.collect()}
    for name in names:
        assert name in docs, f"metric {name} is not in docs/dispatch.md"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(\./dev \w+)", readme, re.M)
    assert commands[:2] == ["./dev demo", "./dev test"]
    assert "exec ./dev test" in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize(("module", "command"), [
    ("dispatchd.cli", "serve"), ("dispatchd.cli", "send"), ("dispatchd.cli", "tail"),
    ("dispatchd.cli", "export"), ("dispatchd.cli", "demo"), ("dispatchd.cli", "webhook-secret"),
    ("dispatchd.cli", "broker-config"),
    ("settlement.cli", "ingest"), ("settlement.cli", "run"),
])
def test_help_describes_each_command(module: str, command: str) -> None:
    """``dispatchd COMMAND --help`` and ``settlement COMMAND --help`` exit 0 and list
    their options, and the docs name the command."""
    import importlib

    result = subprocess.run([sys.executable, "-m", module, command, "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    parser = importlib.import_module(module).build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in subparser._actions:
        for option in action.option_strings:
            assert option in result.stdout
    docs = (ROOT / ("docs/settlement.md" if module.startswith("settlement")
                    else "docs/dispatch.md")).read_text()
    assert f"{module.split('.')[0]} {command}" in docs


def test_serve_reports_a_bad_config_clearly(tmp_path: Path) -> None:
    """A wrong key is named, with exit status 2 and no traceback."""
    config = tmp_path / "c.toml"
    config.write_text("[journal]\nsynchronous = \"SOMETIMES\"\n[mqtt]\nurl = \"http://x\"\n")
    result = subprocess.run([sys.executable, "-m", "dispatchd.cli", "serve", "--config",
                             str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "journal.synchronous" in result.stderr and "mqtt.url" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.broker
@pytest.mark.service
def test_demo_runs_and_reports(tmp_path: Path) -> None:
    """The demo, small: every revision delivered on every kind of channel (the relayed
    ones too), nothing out of order, some expired and escalated by email, a relayed
    dispatch held and released; then the month's meter data generated, ingested (defects
    quarantined) and settled, with a report."""
    result = subprocess.run(
        [sys.executable, "-m", "dispatchd.cli", "demo", "--out", str(tmp_path),
         "--instructions", "60", "--rate", "60"],
        capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"revisions delivered to FSPs *: 65 of 65", out)  # 60 + 2 + 3 relayed
    assert re.search(r"ORD-3 → held: .*'AGR-SOUTH', which is not mapped", out)
    assert re.search(r"held ORD-3 relayed to FSP\d+ at once", out)
    assert "still unreconciled: dsoflex:ORD-3" in out
    assert re.search(r"out-of-order revisions *: 0", out)
    assert re.search(r"expired [1-9]", out)
    assert re.search(r"accepted → received \(websocket\) *: p50", out)
    assert re.search(r"accepted → received \(webhook\) *: p50", out)
    assert re.search(r"emails handed to SMTP *: [1-9]\d* instructions, [1-9]\d* escalations", out)
    assert re.search(r"SO streams saw .*escalated [1-9]", out)
    assert "demo completed" in out
    assert re.search(r"fleet-\d{4}-\d\d\.parquet: (\d+) rows in = \1 stored", out)
    assert re.search(r"late-corrections-\S+: 6 rows in = 0 stored \+ 0 merged \+ 6 "
                     r"quarantined", out)
    report = re.search(r"report: (\S+report\.html)", out)
    assert report is not None and Path(report[1]).exists()
    assert re.search(r"invoice lines: payable £\d+\.\d\d, held £\d+\.\d\d; [1-9]\d* "
                     r"blocking problem", out)
    assert "settlement completed" in out


@pytest.mark.broker
@pytest.mark.service
def test_dispatch_benchmark_runs() -> None:
    """The benchmark script runs end to end at smoke size and prints its ratios."""
    result = subprocess.run([sys.executable, str(ROOT / "bench/bench_dispatch.py"), "--quick"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "p99 ratio" in result.stdout and "group commit" in result.stdout


@pytest.mark.service
def test_channel_benchmark_runs() -> None:
    """The channel benchmark runs at smoke size and prints its figures and ratios."""
    result = subprocess.run([sys.executable, str(ROOT / "bench/bench_channels.py"), "--quick"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ratio p99 flexops / bare" in result.stdout
    assert "memory per idle connection" in result.stdout and "messages/s" in result.stdout


def test_settlement_benchmark_runs(tmp_path: Path) -> None:
    """The settlement benchmark runs at a small size and prints its ratio and memory."""
    result = subprocess.run([sys.executable, str(ROOT / "bench/bench_settlement.py"),
                             "--assets", "400", "--data", str(tmp_path / "data")],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "settlement run 2026-10" in result.stdout
    assert re.search(r"ratio [\d.]+× \(target ≤ 3×\); peak", result.stdout)


def test_webhook_secret_prints_a_usable_secret() -> None:
    from dispatchd.webhooks import secret_key

    result = subprocess.run([sys.executable, "-m", "dispatchd.cli", "webhook-secret"],
                            capture_output=True, text=True, check=True)
    assert len(secret_key(result.stdout.strip())) == 32


def test_settlement_docs_name_every_log_column_and_rejection_reason() -> None:
    from dispatchd.export import DISPATCH_LOG_SCHEMA
    from tests.settlement.test_meterdata import BROKEN

    docs = (ROOT / "docs/settlement.md").read_text()
    for column in DISPATCH_LOG_SCHEMA:
        assert f"`{column}`" in docs, column
    for reason in set(BROKEN.values()) - {"merged"}:
        field, _, words = reason.partition(" ")
        phrase = words if field in ("period_start", "kwh", "flow", "quality") else reason
        assert phrase in docs, reason


def test_baseline_docs_name_every_preset_method_and_output_column() -> None:
    from baselines.compute import OUTPUT_SCHEMA
    from baselines.methods import PRESETS

    docs = (ROOT / "docs/baselines.md").read_text()
    for name in [*PRESETS, *OUTPUT_SCHEMA, "PreEvent", "Nominated", "Fixed",
                 "ReferenceProfile", "SameDayAdjustment"]:
        assert name in docs, name
