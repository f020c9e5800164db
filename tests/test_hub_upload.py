"""Hub uploads and resuming from the hub (--huggingface_*), without a network.

The uploader is tested against a fake ``HfApi``; the real huggingface_hub is tested where it needs
no network: offline mode, an endpoint nobody listens on, and a state resumed from the local hub cache.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.sdxl.weights_io import read_weights
from library.training.options import build_parser
from library.training.hub_upload import (
    HubOptions,
    HubStateRef,
    HubUploader,
    download_state,
    parse_state_ref,
)
from tests.test_train_script import base_options, run_train, write_config


def hub_options(*argv: str) -> HubOptions:
    return HubOptions.from_args(build_parser().parse_args(list(argv)))


class FakeApi:
    """Records what an HfApi would be asked to do; ``gate`` holds uploads until the test releases them."""

    def __init__(self, exists: bool = False, private: bool = True, fail: Exception | None = None):
        self.exists, self.private, self.fail = exists, private, fail
        self.calls: list[tuple] = []
        self.contents: dict[str, bytes | list[str]] = {}
        self.gate: threading.Event | None = None

    def repo_info(self, repo_id, repo_type=None):
        self.calls.append(("repo_info", repo_id, repo_type))
        if not self.exists:
            from huggingface_hub.errors import RepositoryNotFoundError

            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response
            Exception.__init__(err, "404 Repository Not Found")
            raise err
        return type("Info", (), {"private": self.private})()

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_file(self, repo_id, repo_type, path_or_fileobj, path_in_repo, commit_message):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise self.fail
        self.calls.append(("upload_file", repo_id, repo_type, path_in_repo))
        self.contents[path_in_repo] = Path(path_or_fileobj).read_bytes()

    def upload_folder(self, repo_id, repo_type, folder_path, path_in_repo, commit_message):
        if self.fail:
            raise self.fail
        self.calls.append(("upload_folder", repo_id, repo_type, path_in_repo))
        self.contents[path_in_repo] = sorted(p.name for p in Path(folder_path).iterdir())


def saved(tmp_path: Path) -> tuple[Path, Path]:
    """A file and a state folder as the saver leaves them."""
    out = tmp_path / "out"
    out.mkdir()
    file = out / "tiny.safetensors"
    file.write_bytes(b"weights-1")
    state = out / "tiny-state"
    state.mkdir()
    (state / "train_state.json").write_text("{}")
    (state / "model.safetensors").write_bytes(b"state")
    return file, state


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, message", [
    (["--huggingface_repo_id", "lllite"], "must look like owner/name"),
    (["--huggingface_repo_id", "me/x", "--huggingface_path_in_repo", "a/../b"], "without '.' or '..'"),
    (["--resume_from_huggingface"], "needs --resume {repo_id}/{path_in_repo}"),
    (["--resume_from_huggingface", "--resume", "lllite-state"], "does not start with a repo id"),
    (["--resume_from_huggingface", "--resume", "me/x/s:main:bucket"], "repo type 'bucket' is not one of"),
    (["--resume_from_huggingface", "--resume", "me/x/s:a:model:b"], "too many ':'"),
])
def test_option_mistakes_are_refused(argv, message):
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        hub_options(*argv)


# sd-scripts uploads nothing without a repo id and ignores these: here too, with one warning line each.
@pytest.mark.parametrize("argv, warning", [
    (["--huggingface_path_in_repo", "runs"], "--huggingface_path_in_repo runs does nothing without --huggingface_repo_id"),
    (["--huggingface_repo_type", "dataset"], "--huggingface_repo_type dataset does nothing without --huggingface_repo_id"),
    (["--huggingface_repo_visibility", "public"], "--huggingface_repo_visibility public does nothing without"),
    (["--async_upload"], "--async_upload does nothing without --huggingface_repo_id"),
    (["--huggingface_token", "hf_x"], "--huggingface_token does nothing without --huggingface_repo_id or"),
    (["--huggingface_repo_id", "me/x", "--save_state_to_huggingface"],
     "--save_state_to_huggingface does nothing without --save_state or --save_state_on_train_end"),
])
def test_upload_options_without_their_switch_warn(argv, warning, caplog):
    with caplog.at_level("WARNING"):
        hub_options(*argv)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(warning) and "hf_x" not in warnings[0]


def test_options_resolve_and_keep_the_token_out_of_logs():
    o = hub_options("--huggingface_repo_id", "me/lllite", "--huggingface_token", "hf_secret", "--huggingface_path_in_repo",
                    "/runs/canny/", "--huggingface_repo_type", "dataset", "--huggingface_repo_visibility", "public",
                    "--save_state", "--save_state_to_huggingface", "--async_upload")
    assert (o.repo_id, o.path_in_repo, o.repo_type, o.private, o.upload_states, o.async_upload) == \
        ("me/lllite", "runs/canny", "dataset", False, True, True)
    assert o.token == "hf_secret" and "hf_secret" not in repr(o)
    assert hub_options("--huggingface_repo_id", "me/lllite").private  # private unless public is asked for
    # with --resume_from_huggingface, --resume is a hub reference and not a local folder
    o = hub_options("--resume_from_huggingface", "--resume", "me/lllite/runs/tiny-state:v2:dataset", "--huggingface_token", "t")
    assert o.resume == HubStateRef("me/lllite", "runs/tiny-state", "v2", "dataset") and o.repo_id is None


@pytest.mark.parametrize("spec, ref", [
    ("me/lllite/tiny-state", HubStateRef("me/lllite", "tiny-state", None, "model")),
    ("me/lllite/runs/tiny-state:main", HubStateRef("me/lllite", "runs/tiny-state", "main", "model")),
    ("me/lllite/tiny-state:abc123:dataset", HubStateRef("me/lllite", "tiny-state", "abc123", "dataset")),
    ("me/lllite::space", HubStateRef("me/lllite", "", None, "space")),
])
def test_resume_reference_is_read_as_sd_scripts_writes_it(spec, ref):
    assert parse_state_ref(spec) == ref


# ---------------------------------------------------------------------------------------------- uploading


def test_uploads_files_and_states_where_asked(tmp_path):
    file, state = saved(tmp_path)
    api = FakeApi()
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite", "--huggingface_path_in_repo", "runs"),
                     tmp_path / "stage", api_factory=lambda: api)
    up.upload(file)
    up.upload(state)  # without --save_state_to_huggingface a state stays local
    up.close()
    assert api.calls == [("repo_info", "me/lllite", "model"), ("create_repo", "me/lllite", "model", True, True),
                         ("upload_file", "me/lllite", "model", "runs/tiny.safetensors")]
    assert api.contents["runs/tiny.safetensors"] == b"weights-1"

    api = FakeApi(exists=True)
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite", "--huggingface_repo_type", "dataset", "--save_state",
                                 "--save_state_to_huggingface"), tmp_path / "stage", api_factory=lambda: api)
    up.upload(state)
    up.close()
    assert [c[0] for c in api.calls] == ["repo_info", "upload_folder"]  # an existing repo is not created again
    assert api.calls[-1] == ("upload_folder", "me/lllite", "dataset", "tiny-state")
    assert api.contents["tiny-state"] == ["model.safetensors", "train_state.json"]


def test_explicit_visibility_that_an_existing_repo_does_not_have_is_reported(tmp_path, caplog):
    file, _ = saved(tmp_path)
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite", "--huggingface_repo_visibility", "public"),
                     tmp_path / "stage", api_factory=lambda: FakeApi(exists=True, private=True))
    up.upload(file)
    up.close()
    assert "already exists and is private" in caplog.text


def test_async_upload_keeps_what_it_uploads_when_the_saver_prunes_it(tmp_path):
    file, _ = saved(tmp_path)
    api = FakeApi()
    api.gate = threading.Event()
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite", "--async_upload"), tmp_path / "out" / ".stage",
                     api_factory=lambda: api)
    up.upload(file)  # returns at once: the upload waits on the gate in the background
    file.unlink()  # --save_last_n_steps removes it before its upload ran
    file.write_bytes(b"weights-2")  # and a later save reuses the name
    api.gate.set()
    up.close()
    assert api.contents["tiny.safetensors"] == b"weights-1"
    assert not (tmp_path / "out" / ".stage").exists()  # the staged links are gone after the uploads


def test_failed_uploads_keep_the_local_files_and_end_with_a_clear_error(tmp_path):
    file, state = saved(tmp_path)
    api = FakeApi(fail=PermissionError("403 Forbidden: you cannot write to me/lllite"))
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite", "--save_state", "--save_state_to_huggingface",
                                 "--async_upload", "--huggingface_repo_type", "dataset"),
                     tmp_path / "stage", api_factory=lambda: api)
    up.upload(file)
    up.upload(state)
    with pytest.raises(UserError) as e:
        up.close()
    msg = str(e.value)
    assert "every file is saved locally, but 2 of 2 upload(s) to the hub repo me/lllite failed" in msg
    assert "PermissionError: 403 Forbidden" in msg and f"{file} -> tiny.safetensors" in msg
    assert f"`hf upload me/lllite {file} tiny.safetensors --repo-type dataset`" in msg
    assert file.read_bytes() == b"weights-1" and (state / "train_state.json").is_file()


def test_real_client_against_an_unreachable_hub(tmp_path, monkeypatch):
    """The real HfApi against an endpoint nobody listens on: a connection error, said plainly, file intact."""
    import socket
    import types

    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import HfApi

    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))  # skip the retry back-off
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    file, _ = saved(tmp_path)
    up = HubUploader(hub_options("--huggingface_repo_id", "me/lllite"), tmp_path / "stage",
                     api_factory=lambda: HfApi(endpoint=f"http://127.0.0.1:{port}", token="hf_test"))
    up.upload(file)
    with pytest.raises(UserError, match=r"1 of 1 upload\(s\) to the hub repo me/lllite failed \(\w*(Connect|Connection)\w*"):
        up.close()
    assert file.read_bytes() == b"weights-1"


def test_resume_download_offline_without_a_cached_state_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"--resume me/lllite/tiny-state:main:model \(--resume_from_huggingface\): could "
                                        r"not download the state from the hub \(\w+Error: "):
        download_state(parse_state_ref("me/lllite/tiny-state"), None)


# ---------------------------------------------------------------------------------------------- end to end


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A hub cache holding ``files`` ({path in repo: local folder}) at revision main, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path, folder in files.items():
        shutil.copytree(folder, repo / "snapshots" / commit / path)


def test_offline_run_saves_everything_then_fails_clearly_and_resumes_from_the_hub_cache(tmp_path, tiny_checkpoint):
    opts = base_options(tmp_path, tiny_checkpoint, max_train_steps=2, save_every_n_steps=1, save_last_n_steps=1,
                        save_state=True, huggingface_repo_id="me/lllite", huggingface_path_in_repo="runs",
                        save_state_to_huggingface=True, async_upload=True, cache_latents=True,
                        cache_text_encoder_outputs=True)
    cfg = write_config(tmp_path / "train.toml", **opts)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    os.environ.update(env)
    try:
        res = run_train("--config_file", str(cfg))
    finally:
        for k in env:
            del os.environ[k]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "HF_HUB_OFFLINE is set" in res.stderr
    assert "training finished and every file is saved locally, but 4 of 4 upload(s) to the hub repo me/lllite failed " \
           "(OfflineModeIsEnabled" in res.stderr
    out = tmp_path / "out"
    sd, meta = read_weights(out / "tiny.safetensors")
    assert meta["ss_steps"] == "2" and all(torch.isfinite(v).all() for v in sd.values())
    assert json.loads((out / "tiny-state" / "train_state.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["tiny-state", "tiny-step00000001-state", "tiny-step00000001.safetensors",
                                                     "tiny.safetensors"]  # no staging folder left behind

    # The state as the upload would have put it on the hub, in the local hub cache: resumed offline.
    fake_hub_cache(tmp_path / "cache", "me/lllite", {"runs/tiny-state": out / "tiny-state"})
    cfg2 = write_config(tmp_path / "resume.toml", **base_options(
        tmp_path, tiny_checkpoint, max_train_steps=4, output_name="resumed", cache_latents=True,
        cache_text_encoder_outputs=True, resume="me/lllite/runs/tiny-state:main:model", resume_from_huggingface=True))
    os.environ.update(env)
    try:
        res = run_train("--config_file", str(cfg2))
    finally:
        for k in env:
            del os.environ[k]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "downloading the training state me/lllite/runs/tiny-state:main:model from the hub" in res.stderr
    assert "at step 2 (" in res.stderr
    _, meta = read_weights(out / "resumed.safetensors")
    assert meta["ss_steps"] == "4"
