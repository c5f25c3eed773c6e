"""Models by Hugging Face repo id: the cache (filled by huggingface_hub itself) offline, and downloads
from a stand-in Hub on 127.0.0.1 (`HF_ENDPOINT`, see hub_fixtures.py).

The CLI runs as a subprocess, because huggingface_hub reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE
when it is imported; the oracle is the same checkpoint loaded from its local directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import offload_moe
from chat_fixtures import build_tiny_chat_checkpoint
from conftest import save, tiny_mixtral
from hub_fixtures import FakeHub, repo_files
from offload_moe.checkpoints.hub import Reference, parse_reference
from serve_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
DEAD_ENDPOINT = "http://127.0.0.1:9"   # nothing listens there: any network use fails
NOT_FETCHED = {"pytorch_model.bin": b"\x80\x04pickle" * 64,             # a pickle: never
               "original/model.safetensors": b"\0" * 256,              # another copy: not ours
               "consolidated.safetensors": b"\0" * 256,                # not named by the index
               "README.md": b"# tiny\n"}
PROMPT = "To be, or not to be"


def hub_env(home: Path, endpoint: str, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, PYTHONPATH=str(ROOT), NO_COLOR="1",
               OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def cli(env: dict, *args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_moe", *map(str, args)], env=env, input=stdin or "",
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result) -> str:
    """The error line of a failed command (download progress lines may come before it)."""
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("offload-moe: downloading")]
    assert len(lines) == 1 and lines[0].startswith("offload-moe: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in Hub with three repos:
    org/tiny   a tiny chat model (single model.safetensors): main, and tag v1 with other weights;
    org/sharded the same family, sharded with an index, plus files we must never fetch (NOT_FETCHED);
    org/gated  gated (the Hub answers 403 GatedRepo)."""
    root = tmp_path_factory.mktemp("published")
    main_dir = build_tiny_chat_checkpoint(root / "main", seed=0)
    v1_dir = build_tiny_chat_checkpoint(root / "v1", seed=1)
    sharded_dir = save(tiny_mixtral(), root / "sharded")
    server = FakeHub()
    server.add_commit("org/tiny", repo_files(main_dir), refs=("main",))
    server.add_commit("org/tiny", repo_files(v1_dir), refs=("v1",))
    server.add_commit("org/sharded", {**repo_files(sharded_dir), **NOT_FETCHED})
    server.add_commit("org/gated", repo_files(main_dir))
    server.gated.add("org/gated")
    server.dirs = {"main": main_dir, "v1": v1_dir, "sharded": sharded_dir}
    yield server
    server.close()


@pytest.fixture(scope="module")
def cache(hub, tmp_path_factory):
    """An HF_HOME filled by huggingface_hub's own `snapshot_download` (as transformers leaves it): org/tiny
    at main and at v1. Returns the offline environment, with HF_ENDPOINT pointing nowhere."""
    home = tmp_path_factory.mktemp("hf-home")
    script = ("from huggingface_hub import snapshot_download as get; get('org/tiny'); "
              "get('org/tiny', revision='v1')")
    subprocess.run([sys.executable, "-c", script], env=hub_env(home, hub.url), check=True, timeout=120)
    return hub_env(home, DEAD_ENDPOINT, offline=True)


@pytest.fixture(scope="module")
def local(hub):
    """The oracle: each commit of org/tiny loaded from its own directory."""
    return {name: offload_moe.load(hub.dirs[name], device="cpu") for name in ("main", "v1")}


def greedy(model, prompt=PROMPT, n=8) -> str:
    return model.generate(prompt, temperature=0, max_new_tokens=n).text


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("text, expected", [
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", Reference("mistralai/Mixtral-8x7B-Instruct-v0.1")),
    ("Qwen/Qwen3-30B-A3B@main", Reference("Qwen/Qwen3-30B-A3B", "main")),
    ("openai/gpt-oss-20b@" + "a" * 40, Reference("openai/gpt-oss-20b", "a" * 40)),
    ("org/name@refs/pr/1", Reference("org/name", "refs/pr/1")),
    ("just-a-name", None), ("/abs/org/name", None), ("org/name@", None), ("../org", None), ("a/b/c", None),
    ("models/config.json", None),
])
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


def test_an_existing_directory_is_a_path_not_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_reference("org/name") is None


# ---------------------------------------------------------------- offline, from the cache


def test_generate_by_repo_id_and_revision_offline(cache, local):
    for ref, name in (("org/tiny", "main"), ("org/tiny@v1", "v1")):
        r = cli(cache, "generate", "--model", ref, "--temperature", "0", "--max-new-tokens", 8, PROMPT)
        assert r.returncode == 0, r.stderr
        assert r.stdout == greedy(local[name]) + "\n"


def test_chat_by_repo_id_offline(cache, local):
    r = cli(cache, "chat", "--model", "org/tiny", "--temperature", "0", "--max-new-tokens", 8, stdin="Hello there")
    assert r.returncode == 0, r.stderr
    expected = local["main"].chat([{"role": "user", "content": "Hello there"}], temperature=0, max_new_tokens=8)
    assert r.stdout == expected.text + "\n"


def test_load_by_revision_offline(cache, hub):
    script = "import offload_moe; m = offload_moe.load('org/tiny@v1', device='cpu'); print(m.path)"
    r = subprocess.run([sys.executable, "-c", script], env=cache, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    commit = hub.repos["org/tiny"]["refs"]["v1"]
    assert Path(r.stdout.strip()) == Path(cache["HF_HOME"]) / "hub" / "models--org--tiny" / "snapshots" / commit


def test_info_plan_and_list_offline(cache):
    info = cli(cache, "info", "org/tiny@v1")
    assert info.returncode == 0 and "mixtral" in info.stdout, info.stderr
    plan = cli(cache, "plan", "org/tiny", "--profile", "cpu")
    assert plan.returncode == 0 and "org/tiny under profile cpu" in plan.stdout, plan.stderr
    listing = cli(cache, "list")
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "org/tiny" in line]
    assert len(rows) == 2 and any("org/tiny@v1" in row for row in rows), listing.stdout
    assert all("mixtral" in row and "KB" in row and "ready" in row for row in rows), listing.stdout


def test_serve_by_repo_id_offline(cache, local):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "offload_moe", "serve", "--model", "org/tiny", "--port",
                               str(port), "--device", "cpu"], env=cache, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if "serving" in line or "error" in line:
                break
        assert "serving 'org/tiny'" in line, line
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(300):  # "serving" is logged just before uvicorn's socket accepts
            try:
                models = httpx.get(f"{base}/models")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert models.json()["data"][0]["id"] == "org/tiny"
        body = {"model": "org/tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{base}/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == greedy(local["main"])
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
        server.stderr.close()


def test_quantize_and_bench_by_repo_id_offline(cache, tmp_path):
    out = tmp_path / "tiny-int4"
    q = cli(cache, "quantize", "org/tiny", out, "--experts", "int4", "--group-size", 16, "--device", "cpu")
    assert q.returncode == 0, q.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    b = cli(cache, "bench", "--model", "org/tiny@v1", "--tokens", 4, "--no-baselines", "--device", "cpu",
            "--json", tmp_path / "bench.json")
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "bench.json").exists()


def test_offline_and_not_cached_is_one_line(cache):
    line = one_line_error(cli(cache, "generate", "--model", "org/absent", PROMPT))
    assert "org/absent" in line and "offload-moe pull org/absent" in line and "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------- downloads from the stand-in Hub


def wanted(hub) -> set[str]:
    index = json.loads((hub.dirs["sharded"] / "model.safetensors.index.json").read_text())
    return {"config.json", "generation_config.json", "model.safetensors.index.json", *index["weight_map"].values()}


def test_pull_fetches_only_what_we_load_into_the_hf_cache(hub, tmp_path):
    from huggingface_hub import scan_cache_dir

    env = hub_env(tmp_path / "hf", hub.url)
    r = cli(env, "pull", "org/sharded")
    assert r.returncode == 0, r.stderr
    assert hub.fetched("org/sharded") == wanted(hub)
    progress = [line for line in r.stderr.splitlines() if line.startswith("offload-moe: downloading org/sharded: ")]
    assert len(progress) >= 2 and progress[-1].endswith(progress[-1].split(": ")[-1].split(" of ")[1])
    # huggingface_hub's own reading of the cache finds the repo at main with exactly those files
    (repo,) = scan_cache_dir(tmp_path / "hf" / "hub").repos
    (revision,) = repo.revisions
    assert repo.repo_id == "org/sharded" and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == {Path(f).name for f in wanted(hub)}
    for f in revision.files:
        assert f.file_path.read_bytes() == (hub.dirs["sharded"] / f.file_name).read_bytes()
    # cached now: a second pull and a load fetch nothing
    before = len([q for q in hub.requests if q[0] == "GET" and "/resolve/" in q[1]])
    assert cli(env, "pull", "org/sharded").returncode == 0
    assert len([q for q in hub.requests if q[0] == "GET" and "/resolve/" in q[1]]) == before


def test_pull_in_a_terminal_shows_a_progress_bar(hub, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    last = sorted(f for f in wanted(hub) if f.endswith(".safetensors"))[-1]
    hub.stalled.clear()
    hub.release.clear()
    hub.stall_after[f"org/sharded/{last}"] = 1000   # hold the last shard a moment, so the bar is drawn
    child = pexpect.spawn(sys.executable, ["-m", "offload_moe", "pull", "org/sharded"], encoding="utf-8",
                          env={**hub_env(tmp_path / "hf", hub.url), "TERM": "xterm", "COLUMNS": "120"},
                          dimensions=(40, 120), timeout=60)
    try:
        child.expect(r"download\s.*\d+\.\d+ KB/\d+\.\d+ KB")
    finally:
        hub.release.set()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_plan_fetches_config_json_alone(hub, tmp_path):
    home = tmp_path / "hf"
    r = cli(hub_env(home, hub.url), "plan", "org/tiny@v1", "--profile", "cpu")
    assert r.returncode == 0, r.stderr
    snapshot = home / "hub" / "models--org--tiny" / "snapshots" / hub.repos["org/tiny"]["refs"]["v1"]
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]
    # offline, that snapshot is not enough to load the model, and both list and generate say so
    offline = hub_env(home, DEAD_ENDPOINT, offline=True)
    line = one_line_error(cli(offline, "generate", "--model", "org/tiny@v1", PROMPT))
    assert "incomplete (model.safetensors missing)" in line and "offload-moe pull org/tiny@v1" in line
    listing = cli(offline, "list")
    assert "org/tiny@v1" in listing.stdout and "incomplete" in listing.stdout, listing.stdout
    # piped at 80 columns, the command that finishes it is whole on one line, to be copied
    listing = cli({**offline, "COLUMNS": "80"}, "list")
    assert "offload-moe pull org/tiny@v1\n" in listing.stdout, listing.stdout
    # and `pull` with the Hub out of reach says what `list` says: incomplete, not absent
    line = one_line_error(cli(hub_env(home, DEAD_ENDPOINT), "pull", "org/tiny@v1"))
    assert "org/tiny@v1: incomplete in the Hugging Face cache (model.safetensors missing)" in line, line


def test_a_short_disk_is_refused_before_anything_is_written(hub, tmp_path):
    files = repo_files(hub.dirs["main"])
    hub.add_commit("org/huge", files)
    hub.claimed_size["org/huge/model.safetensors"] = 10**16   # 10 PB: no disk has that free
    requests = len(hub.requests)
    line = one_line_error(cli(hub_env(tmp_path / "hf", hub.url), "pull", "org/huge"))
    assert "org/huge" in line and "needs 10000.00 TB" in line and "free" in line
    assert not (tmp_path / "hf" / "hub" / "models--org--huge").exists()
    assert not [q for q in hub.requests[requests:] if "/resolve/" in q[1] and q[2] is None and q[0] == "GET"
                and not q[1].endswith(".json")]


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path):
    # huggingface_hub writes what it received in chunks of 10 MiB: a 12 MB checkpoint cut after 11 MB
    # resumes from the chunk it finished, with a Range request, instead of starting over.
    big = tmp_path / "big"
    tiny_mixtral(vocab_size=48000, num_hidden_layers=1).save_pretrained(big)  # one model.safetensors
    hub.add_commit("org/big", repo_files(big))
    size = (big / "model.safetensors").stat().st_size
    assert size > 12 * 10**6
    hub.drop_after["org/big/model.safetensors"] = 11 * 10**6
    r = cli(hub_env(tmp_path / "hf", hub.url), "pull", "org/big")
    assert r.returncode == 0, r.stderr
    first, second = hub.gets("org/big", "model.safetensors")
    assert first is None and second.startswith("bytes=") and 0 < int(second[6:-1]) <= 11 * 10**6, second
    (file,) = (tmp_path / "hf" / "hub" / "models--org--big" / "snapshots").glob("*/model.safetensors")
    assert file.read_bytes() == (big / "model.safetensors").read_bytes()


def test_an_interrupted_pull_continues_with_the_files_it_lacks(hub, tmp_path):
    env = hub_env(tmp_path / "hf", hub.url)
    last = sorted(f for f in wanted(hub) if f.endswith(".safetensors"))[-1]
    hub.stalled.clear()
    hub.release.clear()
    hub.stall_after[f"org/sharded/{last}"] = 1000
    start = len(hub.requests)
    pull = subprocess.Popen([sys.executable, "-m", "offload_moe", "pull", "org/sharded"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.stalled.wait(60), "the pull never reached the last shard"
        time.sleep(0.5)
        pull.send_signal(signal.SIGINT)
        out, err = pull.communicate(timeout=30)
    finally:
        hub.release.set()
    assert pull.returncode == 130 and err.strip().splitlines()[-1] == "offload-moe: interrupted", err
    first_run = {p for m, p, _ in hub.requests[start:] if m == "GET" and "/resolve/" in p}
    restart = len(hub.requests)
    r = cli(env, "pull", "org/sharded")
    assert r.returncode == 0, r.stderr
    second_run = {p.rsplit("/", 1)[1] for m, p, _ in hub.requests[restart:] if m == "GET" and "/resolve/" in p}
    assert second_run == {last}, (first_run, second_run)   # the finished files are not fetched again
    model = offload_moe.load(r.stdout.split(" in ", 1)[1].strip(), device="cpu")
    assert model.config.num_layers == 3


def test_an_unsupported_family_fails_before_its_weights_are_fetched(hub, tmp_path):
    files = repo_files(hub.dirs["main"])
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "model_type": "llama"}).encode()
    hub.add_commit("org/dense", files)
    line = one_line_error(cli(hub_env(tmp_path / "hf", hub.url), "pull", "org/dense"))
    assert "org/dense: config.json: model_type 'llama' is not supported" in line
    assert hub.fetched("org/dense") == {"config.json"}


def test_a_gated_repo_says_how_to_log_in(hub, tmp_path):
    line = one_line_error(cli(hub_env(tmp_path / "hf", hub.url), "pull", "org/gated"))
    assert "org/gated is gated" in line and "hf auth login" in line and "HF_TOKEN" in line


def test_an_unknown_repo_or_revision_is_one_line(hub, tmp_path):
    env = hub_env(tmp_path / "hf", hub.url)
    assert "no model repo of that name" in one_line_error(cli(env, "info", "org/nothing"))
    assert "no revision 'v9'" in one_line_error(cli(env, "info", "org/tiny@v9"))
