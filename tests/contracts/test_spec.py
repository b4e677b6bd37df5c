"""JobSpec: YAML loading, --set overrides, run id templates and error messages."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.contracts.errors import UserError
from pipeline.contracts.spec import JobSpec, apply_overrides, dump_spec, load_spec

BASE = """\
run:
  name: t
  run_id: "{name}-{date}"
  run_date: 2026-01-02
model:
  preset: tiny
seeds:
  source: seeds/
rollouts:
  steps: 4
output:
  root: out/
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_spec(write(tmp_path, text), overrides)
    return str(info.value)


def test_defaults_and_template(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE))
    assert spec.run.run_id == "t-2026-01-02"
    assert spec.resources.batch_size == "auto" and spec.resources.unit_size() == 16
    assert spec.rollouts.actions.kind == "random"
    assert spec.output.watermark is True
    assert spec.model.device == "auto"


def test_run_date_defaults_to_today_utc(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE.replace("  run_date: 2026-01-02\n", "")))
    assert spec.run.run_date == dt.datetime.now(dt.UTC).date()
    assert spec.run.run_id == f"t-{spec.run.run_date.isoformat()}"


def test_invalid_value_names_the_field_path(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("steps: 4", "steps: 0"))
    assert "rollouts.steps: Input should be greater than 0" in msg


def test_decoding_is_a_checked_choice_of_the_local_model(tmp_path: Path) -> None:
    assert load_spec(write(tmp_path, BASE)).rollouts.decoding == "sequential"
    spec = load_spec(write(tmp_path, BASE), ("rollouts.decoding=diagonal",))
    assert spec.public_dict()["rollouts"]["decoding"] == "diagonal"  # what the manifest keeps
    msg = error_of(tmp_path, BASE, ("rollouts.decoding=zigzag",))
    assert ("rollouts.decoding: Input should be 'sequential', 'diagonal' or "
            "'diagonal-checked'") in msg
    spec = load_spec(write(tmp_path, BASE), ("rollouts.decoding=diagonal-checked",))
    assert spec.public_dict()["rollouts"]["decoding"] == "diagonal-checked"
    endpoint = BASE.replace("  preset: tiny", "  endpoint: http://127.0.0.1:9/")
    msg = error_of(tmp_path, endpoint, ("rollouts.decoding=diagonal",))
    assert "rollouts.decoding is the endpoint's: wham-batch serve --decoding" in msg
    msg = error_of(tmp_path, BASE, ("rollouts.mode=policy", "rollouts.decoding=diagonal"))
    assert "rollouts.mode policy generates none" in msg and "drop rollouts.decoding" in msg


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "  stepz: 3\n")  # lands in output:
    assert "output.stepz: unknown key" in msg


def test_every_error_is_reported(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE, ("rollouts.steps=-1", "resources.batch_size=0",
                                    "seeds.format=jpeg", "resources.gpus_per_actor=x"))
    for path in ("rollouts.steps:", "resources.batch_size:", "seeds.format:",
                 "resources.gpus_per_actor:"):
        assert path in msg
    # union alternatives are merged into one line without pydantic's member tags
    assert "resources.batch_size: Input should be greater than 0 or Input should be 'auto'" in msg
    assert "int" not in msg.split("resources.batch_size")[1].split(":")[0]


def test_missing_required_section(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("output:\n  root: out/\n", ""))
    assert "output: Field required" in msg


def test_model_needs_exactly_one_source(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE, ("model.checkpoint=/x/model",))
    assert "model: set exactly one of model.checkpoint, model.preset and model.endpoint" in msg


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "rollouts: [unclosed\n  x: 1\n")
    assert "YAML syntax error at line" in msg


def test_set_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE), [
        "rollouts.steps=12", "resources.gpus_per_actor=0.5", "output.previews=true",
        "rollouts.sampling.top_k=50", "resources.batch_size=auto", "run.name=nightly",
        "run.run_id=nightly-{date}", "rollouts.actions.kind=constant",
        "rollouts.actions.value=[0,0,1,0,0,0,0,0,0,0,0,0,0.5,0,0,0]",
    ])
    assert spec.rollouts.steps == 12 and spec.resources.gpus_per_actor == 0.5
    assert spec.output.previews is True and spec.rollouts.sampling.top_k == 50
    assert spec.run.run_id == "nightly-2026-01-02"
    assert spec.rollouts.actions.value[2] == 1


def test_set_creates_sections_and_rejects_bad_forms(tmp_path: Path) -> None:
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["rollouts.steps"])
    with pytest.raises(UserError, match="run.name is not a section"):
        apply_overrides({"run": {"name": "x"}}, ["run.name.first=y"])
    msg = error_of(tmp_path, BASE, ("rollouts.nope=1",))
    assert "rollouts.nope: unknown key" in msg


def test_run_id_template_errors(tmp_path: Path) -> None:
    assert "unknown placeholder(s) ['user']" in error_of(tmp_path, BASE, ("run.run_id={user}",))
    assert "must start with a letter" in error_of(tmp_path, BASE, ("run.run_id=../x",))


def test_actions_shorthand_and_checks(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE), ["rollouts.actions=random"])
    assert spec.rollouts.actions.kind == "random"
    assert "needs `value`" in error_of(tmp_path, BASE, ("rollouts.actions.kind=constant",))
    assert "`path` is required" in error_of(tmp_path, BASE, ("rollouts.actions.kind=file",))
    msg = error_of(tmp_path, BASE, ("rollouts.mode=policy",))
    assert "need recorded clips" in msg


def test_dump_round_trips_and_redacts(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE), ["output.endpoint_url=http://user:pw@host:9000/x"])
    again = JobSpec.model_validate(yaml.safe_load(dump_spec(spec)))
    assert again == spec
    public = spec.public_dict()
    assert public["output"]["endpoint_url"] == "http://host:9000/x"
    assert "pw" not in str(public)


@pytest.mark.parametrize("field", ["output", "seeds", "model"])
def test_endpoint_with_a_query_string_is_refused_without_echoing_it(tmp_path: Path,
                                                                    field: str) -> None:
    url = "http://user:pw@host:9000/?X-Amz-Security-Token=SECRETTOKEN#frag"
    msg = error_of(tmp_path, BASE, (f"{field}.endpoint_url={url}",))
    assert f"{field}.endpoint_url" in msg and "query string" in msg
    assert "SECRETTOKEN" not in msg and "pw" not in msg
    assert "must look like" in error_of(tmp_path, BASE, (f"{field}.endpoint_url=ftp://host",))


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(JobSpec)


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "seeds").mkdir()  # validate also checks that local inputs exist and decode
    demo = Path(__file__).resolve().parents[2] / "configs" / "seeds" / "demo" / "scene_00.png"
    (tmp_path / "seeds" / "a.png").write_bytes(demo.read_bytes())
    assert cli_main(["validate", str(path), "--set", "rollouts.steps=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["rollouts"]["steps"] == 7 and out["run"]["run_id"] == "t-2026-01-02"
    assert cli_main(["validate", str(path), "--set", "rollouts.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "rollouts.steps: Input should be greater than 0" in err
    assert "Traceback" not in err


def test_set_keeps_templates_literal(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE), ["run.run_id={name}-x-{date}"])
    assert spec.run.run_id == "t-x-2026-01-02"
    spec = load_spec(write(tmp_path, BASE), ["run.run_id={date}"])
    assert spec.run.run_id == "2026-01-02"


def test_constant_action_values_are_checked(tmp_path: Path) -> None:
    bad = "[2,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]"
    msg = error_of(tmp_path, BASE, ("rollouts.actions.kind=constant",
                                    f"rollouts.actions.value={bad}"))
    assert msg.count("rollouts.actions:") == 1 and "trigger_LT" in msg
    spec = load_spec(write(tmp_path, BASE), [
        "rollouts.actions.kind=constant",
        "rollouts.actions.value={buttons: [button_A], left_stick_x: 0.5}"])
    assert spec.rollouts.actions.value["buttons"] == ["button_A"]
