"""The hub and the way to it (hub.py): is it there, what a failed download means, how long we wait, what the
user sees meanwhile, proxies, and t5-small from the hub.

Only a missing connection (or HF_HUB_OFFLINE=1) may pass for "offline"; a hub that answers 500 or 429, or
stalls, is an error with its status or "timed out". Everything runs against the stand-in hub and proxy
(tests/hub_server.py, tests/proxy_server.py), whatever hub variables the user exported (`hermetic`).
"""

import os
import re
import select
import subprocess
import sys
import time

import pytest
from conftest import DATASET_PATH, ROOT, STAND_IN_HOST, assert_corpus_written, assert_user_error, damage_cached, run_cli
from hub_server import FakeHub, Repo, SilentHub

from t5dialog import corpus_download as dl
from t5dialog import hub

pytestmark = pytest.mark.usefixtures("hermetic")

SCRIPT = ROOT / "data" / "download.py"
TRAIN_ZIP = f"/datasets/{dl.REPO_ID}/resolve/main/train.zip"


def hub_env(fake_hub, tmp_path, **extra):
    return {**fake_hub.env(tmp_path / "hf"), **extra}


# --- is it there: hub.probe / hub.hub_reachable --------------------------------

def test_hub_reachable_live_and_dead_endpoints(fake_hub):
    assert hub.hub_reachable(fake_hub.url)
    assert not hub.hub_reachable("http://127.0.0.1:9")  # nothing listens on the discard port
    assert not hub.hub_reachable(STAND_IN_HOST, timeout=1)  # a name that does not resolve
    assert hub.probe("http://127.0.0.1:9")[0] == hub.UNREACHABLE


def test_a_hub_that_takes_the_connection_and_never_answers_is_no_answer_not_unreachable():
    with SilentHub() as silent:
        state, words = hub.probe(silent.url, timeout=1)
        assert state == hub.NO_ANSWER and "timed out" in words
        assert not hub.hub_reachable(silent.url, timeout=1)


def test_hub_reachable_asks_the_proxy_unless_no_proxy(fake_hub, fake_proxy, hermetic):
    hermetic.setenv("HTTP_PROXY", fake_proxy.url)
    before = fake_proxy.connections
    assert hub.hub_reachable(STAND_IN_HOST)  # only the proxy can reach it, and it answers
    assert fake_proxy.wait_for_connections(before + 1)
    hermetic.setenv("NO_PROXY", "hub.invalid")  # exempt: a direct connection, which fails
    assert not hub.hub_reachable(STAND_IN_HOST, timeout=1)

    hermetic.setenv("HTTP_PROXY", "127.0.0.1:9")  # a dead proxy, given without scheme as many set it
    hermetic.delenv("NO_PROXY")
    assert not hub.hub_reachable(fake_hub.url)  # the hub is up, but behind this proxy it cannot be had
    hermetic.setenv("no_proxy", "127.0.0.1")
    assert hub.hub_reachable(fake_hub.url)


def test_the_probe_is_an_http_request_the_proxy_relays_and_a_tunnel_for_https(fake_hub, fake_proxy, hermetic):
    hermetic.setenv("HTTP_PROXY", fake_proxy.url)
    hermetic.setenv("HTTPS_PROXY", fake_proxy.url)
    assert hub.probe(STAND_IN_HOST)[0] == hub.ANSWERED
    assert fake_proxy.requests == [("HEAD", f"{STAND_IN_HOST}/")]  # a real HTTP question, not a bare connection
    assert fake_hub.requests == [("HEAD", "/")]  # relayed to the hub, which answered it
    # https: the probe asks the proxy for a tunnel (CONNECT), as huggingface_hub's client does. (The stand-in
    # hub speaks no TLS, so nothing answers at the end of it.)
    assert hub.probe("https://hub.invalid", timeout=1)[0] != hub.ANSWERED
    assert fake_proxy.requests[-1] == ("CONNECT", "hub.invalid:443")


@pytest.mark.parametrize("offline, expected", [("1", "False"), ("0", "True")])
def test_hub_reachable_honours_hf_hub_offline_and_hf_endpoint(fake_hub, tmp_path, offline, expected):
    # Both are read by huggingface_hub when it is imported: a fresh interpreter sees them as a user's would.
    env = {**fake_hub.env(tmp_path / "hf"), "HF_HUB_OFFLINE": offline}
    result = run_cli("-c", "from t5dialog import hub; print(hub.hub_reachable(), hub.endpoint())", env=env)
    assert result.stdout.split() == [expected, fake_hub.url], result.stderr[-2000:]


# --- a hub on a bad day: an error with its status, never "offline" ---------------

@pytest.mark.slow
@pytest.mark.parametrize("status, words", [(500, "500 Internal Server Error"), (429, "429 Too Many Requests")])
def test_a_server_error_is_an_error_with_its_status_after_the_clients_retries(fake_hub, tmp_path, status, words):
    fake_hub.faults["train.zip"] = status
    out = tmp_path / "out"
    result = run_cli(SCRIPT, "--out", out, env=hub_env(fake_hub, tmp_path))
    assert_user_error(result, f"the hub answered {words} for train.zip", "re-run")
    assert fake_hub.paths("HEAD").count(TRAIN_ZIP) > 1  # huggingface_hub retried before we said so
    assert "huggingface_hub: " in result.stdout  # its retry notes, on stdout: stderr holds the one line
    assert not out.exists()


@pytest.mark.slow
def test_a_download_that_stalls_mid_file_ends_timed_out(fake_hub, tmp_path):
    fake_hub.faults["train.zip"] = "stall"  # half the bytes, then an open, silent connection
    out = tmp_path / "out"
    # A 1 s read timeout keeps the test short; the product's own default is hub.DOWNLOAD_TIMEOUT_S.
    result = run_cli(SCRIPT, "--out", out, env=hub_env(fake_hub, tmp_path, HF_HUB_DOWNLOAD_TIMEOUT="1"), timeout=120)
    assert_user_error(result, "downloading train.zip", "timed out (nothing received for 1 s)", "re-run later")
    assert len([p for p in fake_hub.paths("GET") if p.startswith("/cdn/")]) > 1  # it resumed, and was stalled again
    assert not out.exists()


@pytest.mark.slow
def test_a_hub_that_never_answers_is_reported_by_the_probe(tmp_path):
    with SilentHub() as silent:
        env = {"HF_ENDPOINT": silent.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HUB_PROBE_TIMEOUT": "1"}
        # The timeout only stops a hang (without a bounded probe it was 396 s); no timing is asserted.
        result = run_cli(SCRIPT, "--out", tmp_path / "out", env=env, timeout=120)
    assert_user_error(result, f"{silent.url} took the connection but then timed out", "HF_HUB_OFFLINE=1")


@pytest.mark.parametrize("raw", ["soon", "0", "-2"])
def test_a_bad_probe_timeout_is_named(hermetic, raw):
    hermetic.setenv("HUB_PROBE_TIMEOUT", raw)
    with pytest.raises(hub.UserError, match=f"HUB_PROBE_TIMEOUT={raw} is not a number of seconds"):
        hub.probe("http://127.0.0.1:9")


def test_huggingface_hubs_waits_are_capped_unless_the_user_set_them(hermetic):
    from huggingface_hub import constants

    hermetic.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    hub.bound_waits()
    assert constants.HF_HUB_DOWNLOAD_TIMEOUT == hub.DOWNLOAD_TIMEOUT_S
    assert constants.HF_HUB_ETAG_TIMEOUT == 7  # the metadata timeout is the user's
    hermetic.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "30")  # the user's choice wins (huggingface_hub read it at import)
    hermetic.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 30)
    hub.bound_waits()
    assert constants.HF_HUB_DOWNLOAD_TIMEOUT == 30


def test_hub_py_imports_only_what_requirements_txt_names():
    """The HTTP client comes with huggingface_hub (huggingface_hub.utils.httpx), whatever its package is called."""
    import ast

    named = {re.split(r"[<>=!~; \[]", line.strip())[0].lower().replace("-", "_")
             for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    tree = ast.parse((ROOT / "t5dialog" / "hub.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = imported - set(sys.stdlib_module_names) - {"t5dialog", "__future__"}
    assert outside and outside <= named, (outside, named)


# --- a damaged copy: downloaded again once, else one line naming a fix that works ------------

@pytest.mark.slow
def test_a_damaged_zip_in_the_hub_cache_is_downloaded_again(fake_hub, tmp_path):
    env, out = hub_env(fake_hub, tmp_path), tmp_path / "out"
    assert run_cli(SCRIPT, "--out", tmp_path / "first", env=env).returncode == 0
    damage_cached(tmp_path / "hf", "train.zip")  # huggingface_hub never checks it again

    # Offline it cannot be mended; the line says what can, and doing just that works.
    result = run_cli(SCRIPT, "--out", out, env={**env, "HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "train.zip", "corrupted", "unset HF_HUB_OFFLINE and re-run")
    fetched = len([p for p in fake_hub.paths("GET") if p.startswith("/cdn/")])
    result = run_cli(SCRIPT, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train.zip in the Hugging Face cache is damaged" in result.stdout and "downloading it again" in result.stdout
    assert len([p for p in fake_hub.paths("GET") if p.startswith("/cdn/")]) == fetched + 1
    assert_corpus_written(out, fake_hub.repos[("datasets", dl.REPO_ID)].commit)


@pytest.mark.slow
def test_a_zip_the_hub_serves_damaged_is_one_line_naming_a_way_round(hub_repos, tmp_path):
    good = hub_repos[0][("datasets", dl.REPO_ID)]
    flipped = bytearray(good.files["train.zip"])
    flipped[60] ^= 0xFF  # inside the first member's compressed data; the size stays right
    with FakeHub({("datasets", dl.REPO_ID): Repo({**good.files, "train.zip": bytes(flipped)})}) as bad:
        result = run_cli(SCRIPT, "--out", tmp_path / "out", env=hub_env(bad, tmp_path))
    assert_user_error(result, "corrupted", "also as downloaded again", "`python data/download.py --from-dir DIR`")
    assert not (tmp_path / "out").exists()


# --- what the user sees while it downloads -----------------------------------

def run_on_a_terminal(args, env, tmp_path, timeout=300):
    """Run a script with stderr on a pseudo-terminal (as in a shell): (exit code, stdout, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, as a window has
    with open(tmp_path / "stdout", "w+") as stdout:
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=stdout, stderr=terminal,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env})
        os.close(terminal)
        shown, deadline = b"", time.monotonic() + timeout  # only stops a hang; no timing is asserted
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the script ended and closed its end
                    break
                if not data:
                    break
                shown += data
        os.close(master)
        code = proc.wait(timeout=60)
        stdout.seek(0)
        return code, stdout.read(), shown.decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_each_file_gets_a_progress_bar(fake_hub, tmp_path):
    code, stdout, shown = run_on_a_terminal([SCRIPT, "--out", tmp_path / "out"], hub_env(fake_hub, tmp_path), tmp_path)
    assert code == 0, shown[-2000:]
    for split in dl.SPLITS:
        assert f"{split}.zip: 100%" in shown  # tqdm's bar, named by the file rather than the CDN's URL
    assert "downloading train.zip" not in stdout  # the bar says it; no line besides


# --- proxies -----------------------------------------------------------------

@pytest.mark.slow
def test_cli_downloads_through_a_proxy(fake_hub, fake_proxy, tmp_path):
    # hub.invalid resolves nowhere: the probe and every request must go through the proxy.
    out = tmp_path / "out"
    env = {**fake_hub.env(tmp_path / "hf", endpoint=STAND_IN_HOST), **fake_proxy.env()}
    result = run_cli(SCRIPT, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_corpus_written(out, fake_hub.repos[("datasets", dl.REPO_ID)].commit)
    for split in dl.SPLITS:
        assert ("HEAD", f"{STAND_IN_HOST}{DATASET_PATH}/{split}.zip") in fake_proxy.requests
    assert [t for m, t in fake_proxy.requests if "/cdn/" in t]
    assert len(fake_hub.requests) == len(fake_proxy.requests)  # nothing reached the hub directly

    # The same with the hub's name exempted from the proxy: nothing can reach it, one line says so.
    result = run_cli(SCRIPT, "--out", tmp_path / "out2", env={**env, "NO_PROXY": "hub.invalid", "no_proxy": "hub.invalid"})
    assert_user_error(result, "cannot reach http://hub.invalid", "HF_HUB_OFFLINE=1", "--from-dir")


# --- t5-small from the hub ---------------------------------------------------

LOAD_T5_SMALL = ("from t5dialog import models; m, t = models.load_pretrained('t5-small'); "
                 "print(sum(p.numel() for p in m.parameters()), t('Hi there .').input_ids)")


@pytest.mark.slow
def test_load_pretrained_gets_t5_small_from_the_hub_then_its_cache(fake_hub, tiny_model, tmp_path):
    env = hub_env(fake_hub, tmp_path)
    result = run_cli("-c", LOAD_T5_SMALL, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tiny = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    expected = f"{sum(p.numel() for p in tiny.parameters())} {AutoTokenizer.from_pretrained(tiny_model)('Hi there .').input_ids}"
    assert result.stdout.strip() == expected
    # t5-small is an alias (redirect) of google-t5/t5-small; the weights come from the CDN.
    assert "/api/models/t5-small" in fake_hub.paths("GET")
    assert any(p.startswith("/google-t5/t5-small/resolve/") and p.endswith("/model.safetensors") for p in fake_hub.paths("HEAD"))
    assert [p for p in fake_hub.paths("GET") if p.startswith("/cdn/")]
    assert ("HEAD", "/") not in fake_hub.requests  # no probe of its own: the load's first question tells as much

    # Online again: one question (which commit is main), and the cache has that commit's files.
    asked = len(fake_hub.requests)
    again = run_cli("-c", LOAD_T5_SMALL, env=env)
    assert again.returncode == 0 and again.stdout == result.stdout, again.stderr[-3000:]
    assert fake_hub.paths()[asked:] == ["/api/models/t5-small", "/api/models/google-t5/t5-small"]

    asked = len(fake_hub.requests)
    offline = run_cli("-c", LOAD_T5_SMALL, env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout == result.stdout, offline.stderr[-3000:]
    assert len(fake_hub.requests) == asked


@pytest.mark.slow
def test_a_cached_model_loads_when_the_hub_is_unreachable_or_hangs(fake_hub, tmp_path):
    """Not reached or not answering, the hub's first question fails; the cache stands in, without the
    library's retries (a refused connection) or its endless wait (a hub that never answers)."""
    env = hub_env(fake_hub, tmp_path)
    cached = run_cli("-c", LOAD_T5_SMALL, env=env)
    assert cached.returncode == 0, cached.stderr[-3000:]

    refused = run_cli("-c", LOAD_T5_SMALL, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert refused.returncode == 0 and refused.stdout.endswith(cached.stdout), refused.stderr[-3000:]
    assert "Retrying" not in refused.stderr + refused.stdout
    assert "Could not reach the Hub" in refused.stdout  # huggingface_hub's note, on stdout with the run's account

    with SilentHub() as silent:
        result = run_cli("-c", LOAD_T5_SMALL, env={**env, "HF_ENDPOINT": silent.url, "HUB_PROBE_TIMEOUT": "1"}, timeout=120)
    assert result.returncode == 0 and result.stdout == cached.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_a_model_the_hub_does_not_have_is_the_librarys_error_not_offline(fake_hub, tmp_path):
    """The hub answered (404): no fallback to the cache, the load reports it in transformers' words."""
    code = "from t5dialog import models; models.load_pretrained('someone/no-such-model')"
    result = run_cli("-c", code, env=hub_env(fake_hub, tmp_path))
    assert result.returncode != 0
    assert "someone/no-such-model is not a local folder and is not a valid model identifier" in result.stderr
    assert "/api/models/someone/no-such-model" in fake_hub.paths("GET")
