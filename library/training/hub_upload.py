"""Uploads to the Hugging Face Hub, and resuming from a state kept there (sd-scripts' ``--huggingface_*``).

The saver writes every file and state folder locally first and then hands it to ``HubUploader``:
an upload never touches the local copy, and a failed upload (no network, no permission) is logged
when it happens and reported at the end of the run with what was not uploaded, after everything
was saved. With ``--async_upload`` uploads run in one background thread, in the order of saving,
while training goes on; the run waits for them at the end. Each queued upload holds a hard link to
what it uploads, so ``--save_last_n_*`` may remove the local file before its upload runs.

``--resume_from_huggingface`` reads ``--resume`` as ``{repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]``
(sd-scripts' form) and downloads that state folder into the hub cache before training starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from library.cli import Needs, Options, flag, option, option_label, switched_off
from library.errors import UserError
from library.training.saving import SavingOptions
from library.training.states import STATE_FILE, state_problem

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
VISIBILITIES = ("public", "private")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubStateRef:
    """A state folder on the hub: ``--resume`` with ``--resume_from_huggingface``."""

    repo_id: str
    path_in_repo: str  # "" for the repo's top level
    revision: str | None = None
    repo_type: str = "model"

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.path_in_repo}:{self.revision or 'main'}:{self.repo_type}"


_UPLOADS = Needs("huggingface_repo_id", "it applies to uploads")


@dataclass(frozen=True)
class HubOptions(Options):
    group = "Hugging Face Hub"

    repo_id: str | None = option(
        name="huggingface_repo_id",
        help="upload every LLLite file saved (and state folders with --save_state_to_huggingface) to this hub "
             "repo, owner/name; a missing repo is created. Each upload starts after the file is complete on "
             "disk and never changes it; failed uploads are listed at the end and the run then exits with an "
             "error, the local files kept")
    token: str | None = option(
        name="huggingface_token", repr=False,  # a secret: kept out of every repr and log
        help="hub access token for uploads and --resume_from_huggingface (default: HF_TOKEN or the login of "
             "`hf auth login`). Never logged")
    path_in_repo: str = option(
        name="huggingface_path_in_repo", needs=_UPLOADS, held="",
        help="folder in the repo for the uploads (default: the repo's top level); files and state folders "
             "keep their local names under it, as in sd-scripts")
    repo_type: str = option(name="huggingface_repo_type", choices=REPO_TYPES, needs=_UPLOADS, held="model",
                            help="type of the upload repo (default model)")
    visibility: str | None = option(
        name="huggingface_repo_visibility", choices=VISIBILITIES, needs=_UPLOADS,
        help="visibility of the repo when the upload creates it: private (the default, as in sd-scripts) or "
             "public. An existing repo keeps its visibility; given explicitly, a repo of the other "
             "visibility is reported with a warning")  # None: private, as in sd-scripts, without checking an existing repo
    upload_states: bool = flag(
        name="save_state_to_huggingface", needs=_UPLOADS,
        help=f"upload state folders too (needs --huggingface_repo_id and {option_label(SavingOptions, 'save_state')} or "
             f"{option_label(SavingOptions, 'save_state_on_train_end')})")
    resume_from_huggingface: bool = flag(
        help="--resume names a state folder on the hub, as {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]] "
             "(sd-scripts' form; revision default main, repo_type default model), e.g. "
             "me/lllite/lllite-000004-state:main:model. It is downloaded to the hub cache before training and "
             "resumed from; it must be a state written by this script")
    async_upload: bool = flag(
        needs=_UPLOADS,
        help="upload in a background thread while training goes on (needs --huggingface_repo_id); the run "
             "waits for every upload at the end (sd-scripts uploads the last file synchronously and does not "
             "wait for the others)")
    resume: HubStateRef | None = None

    @property
    def private(self) -> bool:
        return self.visibility != "public"

    @classmethod
    def settle(cls, v: dict, args: argparse.Namespace) -> dict:
        repo_id = v["repo_id"]
        if repo_id is not None and not _REPO_ID.match(repo_id):
            raise UserError(f"--huggingface_repo_id {repo_id!r} must look like owner/name (letters, digits, '.', '_', '-')")
        if repo_id is None:
            if v["token"] is not None and not v["resume_from_huggingface"]:
                switched_off("--huggingface_token", "--huggingface_repo_id or --resume_from_huggingface")
        elif v["upload_states"] and not (args.save_state or args.save_state_on_train_end):
            switched_off("--save_state_to_huggingface", f"{option_label(SavingOptions, 'save_state')} or "
                         f"{option_label(SavingOptions, 'save_state_on_train_end')}",
                         "it uploads the state folders they write")
        resume = None
        if v["resume_from_huggingface"]:
            if not args.resume:
                raise UserError("--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]], "
                                "e.g. --resume me/lllite/lllite-000004-state:main:model")
            resume = parse_state_ref(args.resume)
        return {**v, "path_in_repo": _clean_path(v["path_in_repo"]), "repo_type": v["repo_type"] or "model",
                "resume": resume}


OPTIONS = (HubOptions,)


def _clean_path(path: str | None, option: str = "--huggingface_path_in_repo") -> str:
    if path is None:
        return ""
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UserError(f"{option} {path!r}: use a plain folder path inside the repo, without '.' or '..'")
    return "/".join(parts)


def parse_state_ref(spec: str) -> HubStateRef:
    """``{repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]``, as sd-scripts reads ``--resume`` for the hub."""
    form = "{repo_id}/{path_in_repo}[:{revision}[:{repo_type}]], e.g. me/lllite/lllite-000004-state:main:model"
    head, *rest = spec.split(":")
    if len(rest) > 2:
        raise UserError(f"--resume {spec} (with --resume_from_huggingface) has too many ':'; the form is {form}")
    segments = [s for s in head.split("/") if s]
    if len(segments) < 2 or not _REPO_ID.match("/".join(segments[:2])):
        raise UserError(f"--resume {spec} (with --resume_from_huggingface) does not start with a repo id owner/name; "
                        f"the form is {form}")
    revision = rest[0] or None if rest else None
    repo_type = rest[1] if len(rest) > 1 and rest[1] else "model"
    if repo_type not in REPO_TYPES:
        raise UserError(f"--resume {spec}: repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    path = _clean_path("/".join(segments[2:]), "--resume")
    return HubStateRef("/".join(segments[:2]), path, revision, repo_type)


def _reason(e: BaseException) -> str:
    """The first line of a hub error, with its type: enough to tell offline from forbidden from missing."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------- resuming


def download_state(ref: HubStateRef, token: str | None, accelerator=None) -> Path:
    """Download the state folder ``ref`` into the hub cache and return its local path.

    With several processes the main process downloads first; the others then find it in the cache.
    """
    from huggingface_hub import snapshot_download

    def fetch() -> Path:
        patterns = [f"{ref.path_in_repo}/*"] if ref.path_in_repo else None
        logger.info("downloading the training state %s from the hub", ref)
        try:
            root = snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                     allow_patterns=patterns, token=token)
        except Exception as e:  # offline, unknown repo or revision, no access: every hub error says why
            raise UserError(f"--resume {ref} (--resume_from_huggingface): could not download the state from the hub "
                            f"({_reason(e)}). Nothing was trained or written; check the repo id, path and revision, "
                            "the network and --huggingface_token") from None
        folder = Path(root) / ref.path_in_repo
        if not folder.is_dir():
            raise UserError(f"--resume {ref} (--resume_from_huggingface): the repo has no folder {ref.path_in_repo!r} "
                            "at that revision")
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"--resume {ref} (--resume_from_huggingface): {STATE_FILE} is missing there; only a state "
                            f"folder written by this script's {option_label(SavingOptions, 'save_state')} can be resumed")
        problem = state_problem(folder)
        if problem is not None:
            raise UserError(f"--resume {ref} (--resume_from_huggingface): {problem}; this state cannot be resumed "
                            "(upload it again from a complete local state)")
        return folder

    if accelerator is None:
        return fetch()
    with accelerator.main_process_first():
        return fetch()


# ---------------------------------------------------------------------------------------------- uploading


@dataclass
class _Failure:
    local: Path
    dest: str
    reason: str


class HubUploader:
    """Uploads saved files and state folders to the repo of ``--huggingface_repo_id`` (main process).

    ``api_factory`` makes the ``HfApi`` (tests pass a fake one). ``close()`` waits for background
    uploads and raises ``UserError`` listing every upload that failed.
    """

    def __init__(self, opts: HubOptions, staging_dir: Path, api_factory: Callable[[], Any] | None = None):
        if opts.repo_id is None:
            raise ValueError("HubUploader needs HubOptions with a repo_id")
        self.opts = opts
        self.staging_dir = Path(staging_dir)
        self._api_factory = api_factory or (lambda: _hf_api(opts.token))
        self._api = None
        self._repo_checked = False
        self._lock = threading.Lock()
        self._executor = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
                          if opts.async_upload else None)
        self._futures: list[concurrent.futures.Future] = []
        self._count = 0
        self.uploaded: list[str] = []
        self.failures: list[_Failure] = []
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            logger.warning("HF_HUB_OFFLINE is set: the uploads to %s will fail; every file is still saved locally",
                           opts.repo_id)

    def dest_of(self, local: Path) -> str:
        return f"{self.opts.path_in_repo}/{local.name}" if self.opts.path_in_repo else local.name

    def upload(self, local: Path) -> None:
        """Called by the saver once ``local`` (a file, or a state folder) is complete on disk."""
        local = Path(local)
        if local.is_dir() and not self.opts.upload_states:
            return
        dest = self.dest_of(local)
        self._count += 1
        if self._executor is None:
            self._upload(local, local, dest)
            return
        staged = self._stage(local)
        self._futures.append(self._executor.submit(self._upload, staged, local, dest, staged))

    def _stage(self, local: Path) -> Path:
        """A hard-linked copy that the queued upload owns (a plain copy where links are not possible)."""
        target = self.staging_dir / f"{self._count:05d}_{local.name}"
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        if local.is_dir():
            shutil.copytree(local, target, copy_function=link)
        else:
            link(str(local), str(target))
        return target

    def _upload(self, src: Path, local: Path, dest: str, staged: Path | None = None) -> None:
        o = self.opts
        try:
            api = self._get_api()
            self._check_repo(api)
            message = f"LLLite training: {local.name}"
            if src.is_dir():
                api.upload_folder(repo_id=o.repo_id, repo_type=o.repo_type, folder_path=str(src), path_in_repo=dest,
                                  commit_message=message)
            else:
                api.upload_file(repo_id=o.repo_id, repo_type=o.repo_type, path_or_fileobj=str(src), path_in_repo=dest,
                                commit_message=message)
        except Exception as e:  # the network, the hub and permissions fail in many ways; none may stop training
            reason = _reason(e)
            with self._lock:
                self.failures.append(_Failure(local, dest, reason))
            logger.error("could not upload %s to the hub repo %s as %s (%s); the local copy is kept", local, o.repo_id,
                         dest, reason)
        else:
            with self._lock:
                self.uploaded.append(dest)
            logger.info("uploaded %s to the hub repo %s as %s", local, o.repo_id, dest)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True) if staged.is_dir() else staged.unlink(missing_ok=True)

    def _get_api(self):
        if self._api is None:
            self._api = self._api_factory()
        return self._api

    def _check_repo(self, api) -> None:
        """Create the repo if it is missing (once); warn when an explicit visibility differs from an existing repo's."""
        if self._repo_checked:
            return
        self._repo_checked = True  # one try: when the hub cannot be reached, the upload itself says so
        o = self.opts
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = api.repo_info(repo_id=o.repo_id, repo_type=o.repo_type)
        except RepositoryNotFoundError:
            api.create_repo(repo_id=o.repo_id, repo_type=o.repo_type, private=o.private, exist_ok=True)
            logger.info("created the %s hub repo %s", "private" if o.private else "public", o.repo_id)
            return
        except Exception as e:  # unreachable or forbidden: the upload that follows reports it
            logger.debug("could not look up hub repo %s: %s", o.repo_id, _reason(e))
            return
        is_private = bool(getattr(info, "private", False))
        if o.visibility is not None and is_private != o.private:
            logger.warning("--huggingface_repo_visibility %s: the hub repo %s already exists and is %s; it keeps that "
                           "visibility (change it on the hub)", o.visibility, o.repo_id,
                           "private" if is_private else "public")

    def close(self, report: bool = True) -> None:
        """Wait for background uploads; with ``report``, raise ``UserError`` if any upload failed."""
        if self._executor is not None:
            pending = sum(not f.done() for f in self._futures)
            if pending:
                logger.info("waiting for %d upload(s) to the hub repo %s", pending, self.opts.repo_id)
            self._executor.shutdown(wait=True)
            self._executor = None
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        if not report or not self.failures:
            return
        o = self.opts
        first = self.failures[0]
        listed = "; ".join(f"{f.local} -> {f.dest}" for f in self.failures[:5])
        more = f" and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
        type_flag = f" --repo-type {o.repo_type}" if o.repo_type != "model" else ""
        raise UserError(
            f"training finished and every file is saved locally, but {len(self.failures)} of {self._count} upload(s) to "
            f"the hub repo {o.repo_id} failed ({first.reason}). Not uploaded: {listed}{more}. Upload them later, e.g. "
            f"`hf upload {o.repo_id} {first.local} {first.dest}{type_flag}`"
        )


def _hf_api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def make_uploader(opts: HubOptions, output_dir: Path, accelerator) -> HubUploader | None:
    """The uploader for ``Saver`` on the main process when ``--huggingface_repo_id`` is given, else None."""
    if opts.repo_id is None or not accelerator.is_main_process:
        return None
    return HubUploader(opts, Path(output_dir) / f".hub_upload_{os.getpid()}")
