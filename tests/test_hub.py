"""The hub and the way to it (hub.py): is it there, proxies, and t5-small from the hub.

Everything runs against the stand-in hub and proxy (tests/hub_server.py, tests/proxy_server.py), whatever hub
variables the user exported (`hermetic`).
"""

import json

import pytest
from conftest import DATASET_PATH, ROOT, STAND_IN_HOST, assert_corpus_written, assert_user_error, run_cli

import corpus as dl
import hub

pytestmark = pytest.mark.usefixtures("hermetic")

SCRIPT = ROOT / "data" / "download.py"


def hub_env(fake_hub, tmp_path, **extra):
    return {**fake_hub.env(tmp_path / "hf"), **extra}


# --- is it there: hub.hub_reachable --------------------------------------------

def test_hub_reachable_live_and_dead_endpoints(fake_hub, hermetic):
    assert hub.hub_reachable(fake_hub.url)
    assert not hub.hub_reachable("http://127.0.0.1:9")  # nothing listens on the discard port
    assert not hub.hub_reachable(STAND_IN_HOST, timeout=1)  # a name that does not resolve


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


def test_fake_proxy_tunnels_connect_as_https_clients_use_it(fake_hub, fake_proxy):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fake_proxy.port, timeout=30)
    conn.set_tunnel("hub.invalid", 80)
    conn.request("GET", f"/api/datasets/{dl.REPO_ID}")
    info = json.loads(conn.getresponse().read())
    conn.close()
    assert info["sha"] == fake_hub.repos[("datasets", dl.REPO_ID)].commit
    assert fake_proxy.requests == [("CONNECT", "hub.invalid:80")]
    assert fake_hub.requests == [("GET", f"/api/datasets/{dl.REPO_ID}")]


@pytest.mark.parametrize("offline, expected", [("1", "False"), ("0", "True")])
def test_hub_reachable_honours_hf_hub_offline_and_hf_endpoint(fake_hub, tmp_path, offline, expected):
    # Both are read by huggingface_hub when it is imported: a fresh interpreter sees them as a user's would.
    env = {**fake_hub.env(tmp_path / "hf"), "HF_HUB_OFFLINE": offline}
    result = run_cli("-c", "import hub; print(hub.hub_reachable(), hub.endpoint())", env=env)
    assert result.stdout.split() == [expected, fake_hub.url], result.stderr[-2000:]


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

@pytest.mark.slow
def test_load_pretrained_gets_t5_small_from_the_hub_then_its_cache(fake_hub, tiny_model, tmp_path):
    code = ("import models; m, t = models.load_pretrained('t5-small'); "
            "print(sum(p.numel() for p in m.parameters()), t('Hi there .').input_ids)")
    env = hub_env(fake_hub, tmp_path)
    result = run_cli("-c", code, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tiny = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    expected = f"{sum(p.numel() for p in tiny.parameters())} {AutoTokenizer.from_pretrained(tiny_model)('Hi there .').input_ids}"
    assert result.stdout.strip() == expected
    # t5-small is an alias (redirect) of google-t5/t5-small; the weights come from the CDN.
    assert "/api/models/t5-small" in fake_hub.paths("GET")
    assert any(p.startswith("/google-t5/t5-small/resolve/") and p.endswith("/model.safetensors") for p in fake_hub.paths("HEAD"))
    assert [p for p in fake_hub.paths("GET") if p.startswith("/cdn/")]

    asked = len(fake_hub.requests)
    offline = run_cli("-c", code, env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout == result.stdout, offline.stderr[-3000:]
    assert len(fake_hub.requests) == asked
