"""The dashboard `exoctl serve` answers `GET /` with, in a real browser (Debian's chromium) against a
real `serve` over two real local workers: nodes, placing from the page, the layer bar against
/state, a streamed chat, a node killed and the reformation, and the API key. Each step leaves a
screenshot (tests/browser.py says where)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exoctl import cpu_policy
from exoctl.models.catalog import DEFAULT_MODEL_ID
from tests.browser import chromium, console_errors, screenshot, until, viewport
from tests.cluster_helpers import Server, WorkerCluster, http, tiny_cluster
from tests.conftest import ARTIFACTS

KEY = "dashboard-secret"
ORIGIN = "http://app.example:8080"


@pytest.fixture(scope="module")
def cluster2(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "dashboard", 2, tiny_models) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    with chromium() as driver:
        yield driver


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    until(
        lambda: any(o.get_attribute("value") == value for o in css(driver, f"#{element_id} option")),
        30,
        f"#{element_id} offers {value!r}",
    )
    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def nodes_on_page(driver: Any) -> dict[str, str]:
    return {
        card.get_attribute("data-node"): card.get_attribute("data-status") for card in css(driver, ".node")
    }


def test_the_page_asks_for_the_api_key_and_works_after_it(cluster2: WorkerCluster, browser: Any) -> None:
    server = Server(cluster2, "--api-key", KEY, "--cors-origin", ORIGIN)
    try:
        browser.get(server.base + "/")
        until(lambda: css(browser, "#key-dialog[open]"), 10, "the key dialog opens")
        screenshot(browser, "01-api-key-asked")
        assert console_errors(browser) == []  # asked before any call: no 401 in the console
        assert css(browser, ".node") == []
        css(browser, "#key-input")[0].send_keys("not-the-key")
        css(browser, "#key-submit")[0].click()
        until(lambda: css(browser, "#key-dialog[open]"), 10, "a wrong key is refused and asked again")
        until(
            lambda: "refused" in css(browser, "#key-error")[0].text, 10, "the dialog says the key was refused"
        )
        console_errors(browser)  # the refused call's 401
        css(browser, "#key-input")[0].send_keys(KEY)
        css(browser, "#key-submit")[0].click()
        until(lambda: nodes_on_page(browser) == {"node1": "up", "node2": "up"}, 15, "both nodes up")
        assert browser.execute_script("return sessionStorage.getItem('exoctl-api-key')") == KEY
        assert console_errors(browser) == []
        screenshot(browser, "02-api-key-accepted")
        # the same key in a new tab of this session: not asked again
        browser.get(server.base + "/")
        until(lambda: len(css(browser, ".node")) == 2, 15, "the nodes, with the kept key")
        assert css(browser, "#key-dialog[open]") == []

        # CORS: off unless asked; here one origin is allowed, and a preflight is answered without the key
        status, _ = http(server, "GET", "/state")
        assert status == 401
        preflight = cors(
            server,
            "OPTIONS",
            "/state",
            ORIGIN,
            {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"},
        )
        assert preflight["status"] == 200 and preflight["allow_origin"] == ORIGIN
        other = cors(server, "GET", "/healthz", "http://elsewhere.example")
        assert other["allow_origin"] is None
    finally:
        server.stop()


def cors(
    server: Server, method: str, path: str, origin: str, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server.base + path, method=method, headers={"Origin": origin, **(extra or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return {
                "status": response.status,
                "allow_origin": response.headers.get("access-control-allow-origin"),
            }
    except urllib.error.HTTPError as error:
        return {"status": error.code, "allow_origin": error.headers.get("access-control-allow-origin")}


def test_place_chat_and_a_lost_node_from_the_page(
    cluster2: WorkerCluster, browser: Any, tiny_models: dict[str, Path]
) -> None:
    server = Server(cluster2)
    try:
        status, body = http(server, "GET", "/healthz")
        assert status == 200 and body["api_key_required"] is False
        assert cors(server, "GET", "/healthz", ORIGIN)["allow_origin"] is None  # CORS is off by default
        browser.get("about:blank")
        console_errors(browser)  # the last page's, whose server has stopped
        browser.get(server.base + "/")
        until(lambda: nodes_on_page(browser) == {"node1": "up", "node2": "up"}, 15, "both nodes up")
        until(
            lambda: all("GiB" in c.text and "RAM" in c.text for c in css(browser, ".node")), 10, "node memory"
        )
        # each node card names the vector path its kernels run, as the node's profile reports it
        kernels = [e.text for e in css(browser, ".node [data-role=kernel]")]
        assert kernels == [f"kernel: {cpu_policy.kernel_path()}"] * 2, kernels
        # and what it measured of itself at its start: the rate its kernels read weights at
        speeds = [e.text for e in css(browser, ".node [data-role=speed]")]
        assert len(speeds) == 2 and all(
            re.fullmatch(r"reads [\d.]+ GB/s f32 · [\d.]+ GB/s int4", s) for s in speeds
        )
        assert console_errors(browser) == []
        screenshot(browser, "03-nodes")

        # place SmolLM2 as a pipeline over both nodes, from the form, after its preview
        choose(browser, "place-model", DEFAULT_MODEL_ID)
        choose(browser, "place-sharding", "Pipeline")
        choose(browser, "place-nodes", "2")
        choose(browser, "place-draft", "ngram")  # speculative decoding by prompt lookup
        chosen = until(lambda: css(browser, "#preview tr.chosen"), 30, "a preview that fits")
        assert chosen[0].get_attribute("data-nodes") == "2" and "node1" in chosen[0].text
        assert re.search(r"node1\s+\[0, 15\) · [\d.]+ [MG]iB\s+node2\s+\[15, 30\)", chosen[0].text), chosen[
            0
        ].text
        screenshot(browser, "04-preview")
        until(lambda: css(browser, "#place-button")[0].is_enabled(), 10, "Place enabled")
        css(browser, "#place-button")[0].click()
        card = until(
            lambda: css(browser, ".instance[data-status=ready]"), 120, "the instance ready on the page"
        )[0]
        instance_id = card.get_attribute("data-instance")
        segments = until(lambda: segments_on_page(browser, instance_id), 10, "the layer bar")
        status, doc = http(server, "GET", f"/instance/{instance_id}")
        assert status == 200
        assert segments == ranges_in_state(doc["CpuRingInstance"]) and [s[0] for s in segments] == [
            "node1",
            "node2",
        ]
        assert segments[0][1] == 0 and segments[-1][2] == 30 and segments[0][2] == segments[1][1]
        screenshot(browser, "05-placed")
        # placing measured the links between the nodes: each card shows its own, as /state has them
        link_text = until(
            lambda: [e.text for e in css(browser, ".node[data-node=node1] [data-role=links]")],
            10,
            "node1's links",
        )
        assert re.fullmatch(r"→ node2: [\d.]+ ms, [\d.]+ (Gbit|Mbit)/s", link_text[0]), link_text

        # chat from the page: streamed, with time to first token and tokens/s
        choose(browser, "chat-instance", instance_id)
        until(lambda: css(browser, "#chat-send")[0].is_enabled(), 10, "Send enabled")
        temperature = css(browser, "#chat-temperature")[0]
        temperature.clear()
        temperature.send_keys("0")  # greedy: the answer the same run to run
        css(browser, "#chat-input")[0].send_keys("What is the capital of France? Answer in one sentence.")
        css(browser, "#chat-send")[0].click()
        answer = until(lambda: css(browser, ".msg.assistant[data-state=done]"), 120, "the answer streamed")[0]
        assert "Paris" in answer.text, answer.text
        stats = css(browser, "#chat-stats")[0].text
        assert "first token" in stats and "tok/s" in stats, stats
        # the second turn reads the first from the instance's cached prefix: the chat's stats say
        # how much, and the instance card counts the hit (placed from a preview: the cache is on)
        css(browser, "#chat-input")[0].send_keys("And of Italy?")
        css(browser, "#chat-send")[0].click()
        until(lambda: len(css(browser, ".msg.assistant[data-state=done]")) == 2, 120, "the second answer")
        stats = css(browser, "#chat-stats")[0].text
        cached = re.search(r"(\d+) of (\d+) prompt tokens cached", stats)
        assert cached is not None and 0 < int(cached.group(1)) < int(cached.group(2)), stats

        def hits() -> int:
            pill = css(browser, f".instance[data-instance='{instance_id}'] [data-role=prefix-cache]")
            return int(pill[0].get_attribute("data-hits")) if pill else 0

        assert until(hits, 10, "the cache hit on the instance card") >= 1
        # placed with prompt lookup: the card says so, with the passes' tokens and acceptance
        speculation = css(browser, f".instance[data-instance='{instance_id}'] [data-role=speculation]")
        assert speculation and speculation[0].text.startswith("ngram · "), speculation
        assert "tok/pass" in speculation[0].text and speculation[0].get_attribute("data-drafted") is not None

        def notes() -> list[str]:
            return [
                n.text
                for n in css(browser, f".instance[data-instance='{instance_id}'] [data-role=runner-note]")
            ]

        # each runner's hit arrives with its own next status (the page polls every second)
        until(
            lambda: len(notes()) == 2 and all("cache" in n and "1 hits" in n for n in notes()),
            10,
            "both runners' hit",
        )
        assert console_errors(browser) == []
        screenshot(browser, "06-chat")
        # usable at 800 wide: one column, nothing wider than the window
        viewport(browser, 800, 900)
        until(
            lambda: browser.execute_script("return document.documentElement.scrollWidth") <= 800,
            5,
            "no overflow",
        )
        screenshot(browser, "06-chat-800-wide")
        viewport(browser, 1400, 900)

        # tensor sharding and Mixtral's experts: each rank's 1/k of every layer, tokens per expert
        mixtral = tiny_models["mixtral"].name
        status, body = http(
            server, "POST", "/place_instance", {"model_id": mixtral, "sharding": "Tensor", "nodes": 2}
        )
        assert status == 200, body
        moe = body["instance_id"]
        chat = {"model": moe, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert http(server, "POST", "/v1/chat/completions", chat)[0] == 200
        ranks = until(
            lambda: css(browser, f'.instance[data-instance="{moe}"] .tensor-row'), 10, "tensor ranks"
        )
        assert [r.get_attribute("data-node") for r in ranks] == ["node1", "node2"]
        assert "rank 0: 1/2 of every layer" in ranks[0].text

        def routed() -> int:
            cells = css(browser, f'.instance[data-instance="{moe}"] [data-role=experts] td[data-tokens]')
            return sum(int(c.get_attribute("data-tokens")) for c in cells)

        # the chat's tokens, routed to the experts, on the page once the next poll has them
        assert until(routed, 10, "the expert heat map with the chat's tokens") > 0
        screenshot(browser, "07-tensor-and-experts")
        css(browser, f'.instance[data-instance="{moe}"] button[data-action=delete]')[0].click()
        until(lambda: not css(browser, f'.instance[data-instance="{moe}"]'), 15, "the deleted instance gone")
        assert http(server, "GET", f"/instance/{moe}")[0] == 404

        # kill node2's worker: the page shows it down within 10 s, then the reformation
        os.kill(cluster2.pid("node2"), signal.SIGKILL)
        killed = time.monotonic()
        until(lambda: nodes_on_page(browser).get("node2") == "down", 10, "node2 shown down")
        down_after = time.monotonic() - killed
        assert css(browser, ".node.down[data-node=node2]")
        screenshot(browser, "08-node-down")
        event = until(lambda: css(browser, "#reformations li[data-action]"), 90, "the reformation listed")[0]
        assert event.get_attribute("data-action") == "replaced" and "node1" in event.text, event.text
        until(
            lambda: css(browser, ".instance[data-status=ready] .seg[data-node=node1]"), 60, "the new instance"
        )
        screenshot(browser, "09-reformation")
        print(f"node2 shown down {down_after:.1f} s after SIGKILL")
    finally:
        server.stop()


def segments_on_page(driver: Any, instance_id: str) -> list[tuple[str, int, int]]:
    return [
        (s.get_attribute("data-node"), int(s.get_attribute("data-start")), int(s.get_attribute("data-end")))
        for s in css(driver, f'.instance[data-instance="{instance_id}"] .seg')
    ]


def ranges_in_state(instance: dict[str, Any]) -> list[tuple[str, int, int]]:
    assignments = instance["shardAssignments"]
    ranges = []
    for node, runner in assignments["nodeToRunner"].items():
        (meta,) = assignments["runnerToShard"][runner].values()
        ranges.append((meta["deviceRank"], node, meta["startLayer"], meta["endLayer"]))
    return [(node, start, end) for _, node, start, end in sorted(ranges)]
