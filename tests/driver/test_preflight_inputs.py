"""What can be known about a job before its actors start is checked before they start, by
`wham-batch validate` and by the driver's preflight: an action script shorter than the
rollouts, seeds that do not decode, a model endpoint that does not answer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml
from support.procs import free_port

from pipeline.cli import main as cli_main
from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import spec_from_data
from pipeline.driver.preflight import preflight
from workers.actor.inputs import check_seed
from workers.wham.actions import ACTION_NAMES

DEMO = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo"


def _job(tmp_path: Path, **sections: dict) -> dict:
    seeds = tmp_path / "seeds"
    if not seeds.exists():
        seeds.mkdir()
        shutil.copyfile(sorted(DEMO.glob("*.png"))[0], seeds / "a.png")
    data = {
        "run": {"name": "pre", "run_id": "pre", "run_date": "2026-05-06"},
        "model": {"preset": "tiny"},
        "seeds": {"source": str(seeds)},
        "rollouts": {"steps": 5},
        "output": {"root": str(tmp_path / "out")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def _validate(tmp_path: Path, data: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = cli_main(["validate", str(config)])
    return code, capsys.readouterr().err


def _script(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "actions.csv"
    lines = [",".join(ACTION_NAMES)] + [",".join(["0"] * len(ACTION_NAMES))] * rows
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_action_script_shorter_than_the_rollouts_fails_before_any_actor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _job(tmp_path, rollouts={"actions": {"kind": "file",
                                                "path": str(_script(tmp_path, 3))}})
    wanted = "has 3 rows, fewer than rollouts.steps=5"
    with pytest.raises(UserError, match="rollouts.actions.path: .*" + wanted):
        preflight(spec_from_data(data))
    code, err = _validate(tmp_path, data, capsys)
    assert code == 2 and wanted in err
    data["rollouts"]["steps"] = 3  # as long as the rollouts: fine
    assert _validate(tmp_path, data, capsys)[0] == 0
    assert preflight(spec_from_data(data)).script.shape == (3, len(ACTION_NAMES))


def test_seeds_that_do_not_decode_fail_before_any_actor_without_reprs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    data = _job(tmp_path)
    seeds = Path(data["seeds"]["source"])
    (seeds / "a.png").write_bytes(b"this is no picture")
    (seeds / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    spec = spec_from_data(data)
    with pytest.raises(UserError, match="seeds.source: none of the 2 seeds") as caught:
        preflight(spec, check_seed=check_seed)
    assert "the data is none of PNG, JPEG" in str(caught.value)
    code, err = _validate(tmp_path, data, capsys)
    assert code == 2 and "seeds.source: none of the 2 seeds" in err
    for text in (str(caught.value), err):
        assert "object at 0x" not in text and "<_io" not in text, text
    # One good seed among them: the run goes on; the bad one is a warning (and a failed row).
    shutil.copyfile(sorted(DEMO.glob("*.png"))[0], seeds / "c.png")
    with caplog.at_level(logging.WARNING, logger="pipeline.driver"):
        assert len(preflight(spec, check_seed=check_seed).seeds) == 3
    assert "2 of 3 seeds read as a sample cannot be used" in caplog.text


def test_validate_checks_that_the_model_endpoint_answers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    data = _job(tmp_path, model={"preset": None, "endpoint": url, "api_key_env": None})
    code, err = _validate(tmp_path, data, capsys)
    assert code == 2 and f"model.endpoint: cannot reach {url}" in err
