"""Model references: a checkpoint directory, or a Hugging Face repo id resolved through `huggingface_hub`.

`resolve("mistralai/Mixtral-8x7B-Instruct-v0.1@main")` returns a local directory: the repo's snapshot
in the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`, huggingface_hub's own layout, shared with
transformers and vLLM) when the files we load are already there, also with `HF_HUB_OFFLINE=1`;
otherwise they are downloaded first by `hf_hub_download`. Only what offload_moe reads is fetched:
`config.json`, the safetensors shards (those the index names, or `model.safetensors`), the tokenizer
and chat template files and `generation_config.json`; never pickles (`*.bin`, `*.pt`), GGUF or the
`original/` copies some repos carry. Before anything is written the bytes still missing are checked
against the free space of the cache's disk.

A dropped connection resumes from the byte reached (huggingface_hub retries with a Range request);
an interrupted run keeps every file it finished, and running it again fetches only the rest
(huggingface_hub 2.x discards the one partial file of a process that exits).

It sits in the family layer, beside `config` and `checkpoint` (which resolves through it): it turns
a reference into a directory, nothing more.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import OffloadMoeError
from ..base.runtime import Progress, fmt_bytes

# Files offload_moe reads from a checkpoint directory (beside the weights).
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
TEMPLATE_DIR = "additional_chat_templates/"  # named templates, as transformers saves them
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
FILE_SUFFIXES = (".json", ".safetensors", ".toml", ".gguf", ".jinja")  # names of files, not of repos
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class Reference:
    """A Hugging Face model repo and an optional revision (branch, tag or commit; None is "main")."""
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_reference(text: str | Path) -> Reference | None:
    """`org/name` or `org/name@revision` that is not an existing path -> a Reference; else None (a path)."""
    text = str(text)
    if Path(text).exists():
        return None
    name, at, revision = text.partition("@")
    if not _REPO_ID.match(name) or ".." in name or (at and not revision) or name.endswith(FILE_SUFFIXES):
        return None  # a path (a missing file such as dir/config.json is reported as a missing file)
    return Reference(name, revision or None)


def model_name(reference: str | Path) -> str:
    """What to call a model in listings and the server's /v1/models: the repo id, or the directory's name."""
    ref = parse_reference(reference)
    return ref.repo_id if ref else Path(reference).resolve().name


def resolve(reference: str | Path, *, want: str = "model", progress: Progress | None = None,
            refresh: bool = False) -> Path:
    """A local directory for `reference`: a path as it is, a repo id through the Hugging Face cache.

    want: "model" (config, weights, tokenizer, templates) or "config" (config.json alone: enough for
    `plan`). refresh: ask the Hub even when the cache has the files (`offload-moe pull`)."""
    ref = parse_reference(reference)
    if ref is None:
        return Path(reference)
    from huggingface_hub import constants

    if not refresh or constants.HF_HUB_OFFLINE:
        folder = cached_snapshot(ref)
        missing = _missing(folder, want) if folder else ["config.json"]
        if not missing:
            return folder
        if constants.HF_HUB_OFFLINE:
            what = "is not" if folder is None else f"is incomplete ({missing[0]} missing)"
            raise OffloadMoeError(f"{ref}: {what} in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                  f"HF_HUB_OFFLINE=1 forbids downloading; run `offload-moe pull {ref}` where the "
                                  "Hub is reachable, or unset HF_HUB_OFFLINE")
    return download(ref, want=want, progress=progress)


def cached_snapshot(ref: Reference) -> Path | None:
    """The cache's snapshot directory for this revision, if it holds at least config.json."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision)
    return Path(found).parent if isinstance(found, str) else None


def _missing(folder: Path, want: str) -> list[str]:
    """Files a local snapshot lacks for `want`: config.json, then the weights (the index's shards)."""
    if not (folder / "config.json").exists():
        return ["config.json"]
    if want == "config":
        return []
    if (folder / INDEX).exists():
        return [f for f in _shards((folder / INDEX).read_text(), str(folder / INDEX)) if not (folder / f).exists()]
    return [] if (folder / SINGLE).exists() else [SINGLE]


def _shards(index_text: str, source: str) -> list[str]:
    try:
        return sorted(set(json.loads(index_text)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise OffloadMoeError(f"{source}: expected JSON with a 'weight_map' object") from None


def download(ref: Reference, *, want: str = "model", progress: Progress | None = None) -> Path:
    """Fetch the files we load from the Hub into the cache (those already there are kept); the snapshot."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.file_download import repo_folder_name

    report = progress or (lambda what, done, total: None)
    with _hub_errors(ref, want) as errors:
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        files = wanted_files(ref, info.sha, siblings, want, storage / "snapshots" / info.sha)
        todo = [f for f in files if not _cached(storage, info.sha, f, siblings[f])]
        need = sum(siblings[f].size or 0 for f in todo)
        check_disk_space(ref, need, Path(constants.HF_HUB_CACHE))
        counter = _ByteCounter(report, need)
        errors.downloading = True
        # config.json first, by the revision asked for: huggingface_hub then records refs/<revision>.
        # The others by commit, so a branch that moves mid-download cannot mix two commits.
        folder = Path(hf_hub_download(ref.repo_id, "config.json", revision=ref.revision,
                                      tqdm_class=counter.bar)).parent
        if want == "model":  # a family offload_moe cannot run fails here, before its weights are fetched
            from .config import ModelConfig
            ModelConfig.from_dict(json.loads((folder / "config.json").read_text()), f"{ref}: config.json")
        for f in files:
            if f != "config.json":
                hf_hub_download(ref.repo_id, f, revision=info.sha, tqdm_class=counter.bar)
    missing = _missing(folder, want)
    if missing:
        raise OffloadMoeError(f"{ref}: downloaded, but {missing[0]} is still missing from {folder}")
    return folder


def wanted_files(ref: Reference, commit: str, siblings: dict, want: str, snapshot: Path) -> list[str]:
    """The repo's files that offload_moe reads, for `want` ("model" or "config"); `snapshot` is where
    the cache keeps this commit (its shard index is read from there when present)."""
    if "config.json" not in siblings:
        raise OffloadMoeError(f"{ref}: the repo has no config.json, so it is not a transformers model")
    if want == "config":
        return ["config.json"]
    files = [f for f in SMALL_FILES if f in siblings]
    files += sorted(f for f in siblings if f.startswith(TEMPLATE_DIR) and f.endswith(".jinja"))
    if INDEX in siblings:
        cached = snapshot / INDEX
        text = cached.read_text() if cached.exists() else _read_remote(ref.repo_id, INDEX, commit)
        shards = _shards(text, f"{ref}: {INDEX}")
        absent = [s for s in shards if s not in siblings]
        if absent:
            raise OffloadMoeError(f"{ref}: {INDEX} names shard {absent[0]!r}, which the repo does not have")
        return files + shards
    if SINGLE in siblings:
        return files + [SINGLE]
    pickles = [f for f in siblings if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    raise OffloadMoeError(f"{ref}: the repo has no safetensors weights ({INDEX} or {SINGLE})"
                          + (f"; it has pickled ones ({pickles[0]}), which offload-moe never loads" if pickles else ""))


def _read_remote(repo_id: str, filename: str, commit: str) -> str:
    """A small file's text straight from the Hub, not stored: the shard index, read before the disk check."""
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers

    response = get_session().get(hf_hub_url(repo_id, filename, revision=commit), headers=build_hf_headers(),
                                 follow_redirects=True)
    hf_raise_for_status(response)
    return response.text


def _cached(storage: Path, commit: str, filename: str, sibling) -> bool:
    """Whether the cache already holds this file (in this snapshot, or its blob from another one)."""
    if (storage / "snapshots" / commit / filename).exists():
        return True
    blob = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
    return blob is not None and (storage / "blobs" / blob).exists()


def check_disk_space(ref: Reference, need: int, cache: Path) -> None:
    """Refuse, before writing anything, a download that the cache's disk cannot hold."""
    where = cache
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise OffloadMoeError(f"{ref}: downloading needs {fmt_bytes(need)} in {cache}, which has {fmt_bytes(free)} "
                              f"free: free {fmt_bytes(need - free)} more, or point HF_HUB_CACHE (or HF_HOME) at a "
                              "larger disk")


class _ByteCounter:
    """Sums the bytes every per-file progress bar of huggingface_hub reports into one callback."""

    def __init__(self, report: Progress, total: int):
        self.done, self.total, self.report = 0, total, report
        counter = self

        class Bar:  # what huggingface_hub needs of a `tqdm_class`: construction, update, a context
            def __init__(self, *args, initial: int = 0, **kwargs):
                counter.add(initial)

            def update(self, n: int = 1):
                counter.add(n or 0)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def close(self):
                pass

            def refresh(self):
                pass

            def set_postfix_str(self, *args, **kwargs):
                pass

            def set_description(self, *args, **kwargs):
                pass

        self.bar = Bar

    def add(self, n: int):
        self.done += n
        self.report("download", self.done, max(self.total, self.done))


class _hub_errors:
    """Turn huggingface_hub's exceptions into one line that says what to do."""

    def __init__(self, ref: Reference, want: str = "model"):
        self.ref, self.want = ref, want
        self.downloading = False  # past the listing and the disk check: files are being written

    def in_cache(self) -> str:
        """What the cache holds of the reference, in the words `offload-moe list` uses."""
        folder = cached_snapshot(self.ref)
        missing = _missing(folder, self.want) if folder else ["config.json"]
        return ("not in the Hugging Face cache" if folder is None else
                f"incomplete in the Hugging Face cache ({missing[0]} missing)" if missing else
                "in the Hugging Face cache")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, OffloadMoeError):
            return False
        from huggingface_hub import constants
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                            RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

        ref, site = self.ref, constants.ENDPOINT
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, GatedRepoError):
            message = (f"{ref.repo_id} is gated: accept its terms at {site}/{ref.repo_id}, then {LOGIN_HINT}")
        elif isinstance(error, RepositoryNotFoundError):
            message = (f"{ref.repo_id}: no such directory, and no model repo of that name on {site} "
                       f"(if it is private, {LOGIN_HINT})")
        elif isinstance(error, RevisionNotFoundError):
            message = f"{ref}: the repo has no revision {ref.revision!r} (a branch, tag or commit)"
        elif isinstance(error, RemoteEntryNotFoundError):
            message = f"{ref}: a file the repo lists is not on the Hub ({first})"
        elif isinstance(error, OfflineModeIsEnabled):
            message = f"{ref}: {self.in_cache()} and HF_HUB_OFFLINE=1 forbids downloading"
        elif isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code == 401:
            message = f"{ref.repo_id}: the Hub refused access (401); {LOGIN_HINT}"
        elif isinstance(error, (HfHubHTTPError, OSError)) or type(error).__module__.startswith(("httpx", "httpcore")):
            if self.downloading:
                message = (f"{ref}: download from {site} failed ({first}); the files already fetched are kept: "
                           "run the same command again to continue")
            else:
                message = (f"{ref}: {self.in_cache()}, and {site} cannot be reached ({first}); "
                           "check the network (HF_ENDPOINT names a mirror)")
        else:
            return False
        raise OffloadMoeError(message) from None


@dataclass(frozen=True)
class CachedModel:
    """One revision of a model repo in the Hugging Face cache that offload_moe can run."""
    repo_id: str
    refs: tuple[str, ...]      # branches and tags pointing at this commit ("main", ...); may be empty
    commit: str
    path: Path                 # the snapshot directory
    size_on_disk: int          # bytes of this revision's files
    model_type: str
    missing: tuple[str, ...]   # files still to fetch for a full load (empty: ready to run)

    @property
    def reference(self) -> str:
        """What to pass to --model: the repo id, with @revision unless it is main."""
        if "main" in self.refs:
            return self.repo_id
        return f"{self.repo_id}@{self.refs[0] if self.refs else self.commit}"


def cached_models() -> list[CachedModel]:
    """The cache's model revisions whose config.json is a family offload_moe supports, by repo id."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .config import ModelConfig

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            folder = Path(rev.snapshot_path)
            try:
                config = ModelConfig.load(folder / "config.json")
            except OffloadMoeError:  # not there, or not a family we run
                continue
            try:
                missing = tuple(_missing(folder, "model"))
            except OffloadMoeError:  # an unreadable shard index: say so rather than fail the listing
                missing = (INDEX,)
            found.append(CachedModel(repo.repo_id, tuple(sorted(rev.refs)), rev.commit_hash, folder,
                                     rev.size_on_disk, config.model_type, missing))
    return sorted(found, key=lambda m: (m.repo_id.lower(), m.refs != ("main",), m.commit))
