"""Credentials never leave the environment, and nothing is written outside output.root.

A whole run (its own Ray instance in a private RAY_TMPDIR, S3 output on loopback) runs with
recognisable dummy credentials -- in the environment and as user:password in the endpoint
URL -- and every byte it leaves behind is searched for them: each object in the bucket, the
manifest, the driver's stdout/stderr and every file of Ray's session folder. The submission
`wham-batch submit` would send is searched too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from support.faultproxy import record_figures

from pipeline.contracts.errors import UserError
from pipeline.contracts.layout import manifest_key, success_key
from pipeline.contracts.storage import open_storage
from workers.actor.actor import RolloutActor

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "seeds" / "demo"
MARKERS = {
    "AWS_ACCESS_KEY_ID": "AKIAKEYMARKER0000042",
    "AWS_SECRET_ACCESS_KEY": "SECRETMARKERxyz0123456789abcdefSECRETMARKER",
    "AWS_SESSION_TOKEN": "SESSIONMARKERtok3nFwoGZXIvYXdzEJr//////////",
}
URL_PASSWORD = "URLPASSWORDMARKER99"
RUN_TIMEOUT_S = 240


def _seeds(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(sorted(DEMO.glob("*.png"))[:n]):
        shutil.copyfile(picture, folder / f"seed_{i}.png")
    return folder


def _find_markers(data: bytes) -> list[str]:
    needles = [*MARKERS.values(), URL_PASSWORD]
    return [n for n in needles if n.encode() in data]


def _job(tmp_path: Path, root: str, endpoint: str) -> dict:
    return {
        "run": {"name": "sec", "run_id": "sec", "run_date": "2026-09-10"},
        "model": {"preset": "tiny", "device": "cpu", "dtype": "float32"},
        "seeds": {"source": str(_seeds(tmp_path / "seeds", 2))},
        "rollouts": {"steps": 2, "per_seed": 1},
        "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 2},
        "output": {"root": root, "endpoint_url": endpoint, "previews": True},
    }


@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_ray_session(
        tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    host = s3_server.removeprefix("http://")
    endpoint = f"http://{MARKERS['AWS_ACCESS_KEY_ID']}:{URL_PASSWORD}@{host}"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_job(tmp_path, s3_bucket, endpoint)))
    ray_tmp = Path(tempfile.mkdtemp(prefix="wsec-"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(MARKERS, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", WHAM_LOG_LEVEL="DEBUG")
    try:
        proc = subprocess.run([sys.executable, "-m", "jobs.run", str(config)], cwd=REPO,
                              env=env, capture_output=True, timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        searched = {"stdout": proc.stdout, "stderr": proc.stderr}
        session_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.name.endswith((".out", ".err", ".log")) for p in session_files)
        for path in session_files:
            searched[f"ray:{path.relative_to(ray_tmp)}"] = path.read_bytes()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    storage = open_storage(s3_bucket)
    keys = list(storage.list_keys())
    assert storage.exists(success_key("2026-09-10", "sec"))
    for key in keys:
        searched[f"s3:{key}"] = storage.get_bytes(key)
    manifest = json.loads(storage.get_bytes(manifest_key("2026-09-10", "sec")))
    assert manifest["spec"]["output"]["endpoint_url"] == s3_server  # redacted, still useful
    leaks = {name: found for name, data in searched.items() if (found := _find_markers(data))}
    assert leaks == {}
    record_figures("secrets_run", files_searched=len(searched), objects=len(keys), leaks=0)


def test_submission_carries_no_credentials(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.submit import build_submission

    for name, value in MARKERS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    outside = tmp_path / "job.yaml"  # outside the project: staged and shipped on its own
    outside.write_text(yaml.safe_dump(_job(tmp_path, "s3://bucket/out", "http://127.0.0.1:9")))
    sub = build_submission(outside, working_dir=REPO, env=("WHAM_LOG_LEVEL=INFO",))
    try:
        text = json.dumps({"entrypoint": sub.entrypoint, "runtime_env": sub.runtime_env,
                           "metadata": sub.metadata}).encode()
        staged = b"".join(p.read_bytes() for d in sub.cleanup for p in Path(d).rglob("*")
                          if p.is_file())
        assert _find_markers(text + staged) == []
        assert sub.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"
    finally:
        sub.remove_staging()
    for name in MARKERS:
        with pytest.raises(UserError, match=name):
            build_submission(outside, working_dir=REPO, env=(name,))
    with pytest.raises(UserError, match="credentials"):
        build_submission(outside, working_dir=REPO,
                         overrides=[f"output.endpoint_url=http://u:{URL_PASSWORD}@h:1"])


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.mark.slow
def test_nothing_is_written_outside_the_output_root(tmp_path: Path, ray_local: None) -> None:
    from pipeline.contracts.spec import spec_from_data
    from pipeline.driver import run_job

    work = tmp_path / "work"
    seeds = _seeds(work / "seeds", 3)
    (seeds / "..dotdot.png").write_bytes((seeds / "seed_0.png").read_bytes())
    (work / "outside.png").write_bytes((seeds / "seed_1.png").read_bytes())
    os.symlink(work / "outside.png", seeds / "link_out.png")
    manifest = work / "seeds.csv"
    manifest.write_text("uri,seed_id\n"
                        f"{seeds / 'seed_0.png'},../../../escaped\n"
                        f"{seeds / 'seed_1.png'},/abs/path\n"
                        f"{seeds / 'seed_2.png'},..\\..\\win\n")
    before = _tree(tmp_path)
    root = work / "out"
    for source, fmt in ((seeds, "images"), (manifest, "manifest")):
        data = _job(work, str(root), "http://127.0.0.1:9")
        data["output"] = {"root": str(root), "previews": True}
        data["seeds"] = {"source": str(source), "format": fmt}
        data["run"]["run_id"] = f"conf-{fmt}"
        data["run"]["max_failed_fraction"] = 0.5
        summary = run_job(spec_from_data(data), actor_cls=RolloutActor, progress=False)
        assert summary.complete
    new = _tree(tmp_path) - before
    assert new and all(p == "work/out" or p.startswith("work/out/") for p in new), sorted(new)
    frames = [p for p in new if p.endswith(".png")]
    assert all("/../" not in p and "\\" not in p for p in frames)
    record_figures("confinement", seeds_tried=7, written=len(new), outside_root=0)
