"""The grpc-web page (src/call/web/) in a real browser: headless Chromium driven by Selenium.

The server serves the page at "/" with [web] on (as in the embedded default); the page speaks
grpc-web to helloworld.Greeter with fetch. These tests click its buttons and read what it shows:
the same-origin page (unary reply, greetings streamed one by one, status codes and messages),
calls with bearer tokens, and calls from a page on another origin, which the server's
web.allowed_origins (CORS) lets through or the browser refuses.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`, installed by
scripts/install-tools); Selenium is told where they are and SE_OFFLINE keeps selenium-manager
from downloading anything. Without them the tests skip, except under CI (CI set), where they fail.
"""

import functools
import http.server
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

import helloworld_pb2 as pb

from conftest import ROOT, RPC_TIMEOUT, GreeterProcess, new_token, toml_str

WEB_DIR = ROOT / "src" / "call" / "web"
ARTIFACTS = ROOT / "target" / "interop"
WAIT = 15.0  # seconds for any state of the page to be reached
STREAM_GREETINGS = 10  # greeter.stream_greetings by default, 100 ms apart
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 "--window-size=1000,1200"]

# One consistent reading of the page's outputs.
SNAPSHOT_JS = """
const status = document.getElementById("status");
return {
  state: status.dataset.state || "",
  code: status.dataset.code || "",
  status: status.textContent,
  reply: document.getElementById("reply").textContent,
  greetings: Array.from(document.querySelectorAll("#greetings li"), (li) => li.textContent),
};
"""


def in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason):
    """Skip on a developer's machine; under CI a browser test that cannot run is a failure."""
    if in_ci():
        pytest.fail(f"{reason}: CI is set, so the browser tests must run (scripts/install-tools "
                    "installs chromium, chromium-driver and selenium)", pytrace=False)
    pytest.skip(f"{reason} (run scripts/install-tools)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        unavailable(f"chromium ({chromium}) or chromedriver ({chromedriver}) not on PATH")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        unavailable(f"selenium not importable: {e}")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    service = Service(executable_path=chromedriver, log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def other_origin():
    """src/call/web/ served by Python's http.server on another loopback port: a second origin."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(WEB_DIR)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="other-origin", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tokens file with a "greeter" token and a "reflection"-only one."""
    tokens_file = tmp_path_factory.mktemp("browser-tokens") / "tokens.toml"
    return {
        "file": tokens_file,
        "greeter": new_token(tokens_file, "browser", ["greeter"]),
        "reflection": new_token(tokens_file, "browser-reflection", ["reflection"]),
    }


def web_greeter(workdir, allowed_origins, tokens_file=None):
    """A plaintext loopback greeter with [web] on, allowing `allowed_origins` (CORS), with token
    auth when tokens_file is given."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    auth = ("[auth]\nenabled = true\n"
            f"tokens_file = {toml_str(tokens_file)}\n\n") if tokens_file else ""
    origins = ", ".join(toml_str(o) for o in allowed_origins)
    config = workdir / "greeter.toml"
    config.write_text(f"{auth}[web]\nenabled = true\nallowed_origins = [{origins}]\n")
    return GreeterProcess(workdir / "server", config=config)


@pytest.fixture(scope="module")
def auth_greeter(tmp_path_factory, tokens, other_origin):
    """Token auth on, and the other origin allowed."""
    server = web_greeter(tmp_path_factory.mktemp("browser-auth"), [other_origin], tokens["file"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refusing_greeter(tmp_path_factory, other_origin):
    """Allows an origin that differs from other_origin by its host name only."""
    lookalike = other_origin.replace("127.0.0.1", "localhost")
    server = web_greeter(tmp_path_factory.mktemp("browser-refusing"), [lookalike])
    yield server
    server.stop()


# ---- driving the page -----------------------------------------------------------------------

def browser_log(driver):
    """The console and network messages the page logged since the last call."""
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")]


def snapshot(driver):
    return driver.execute_script(SNAPSHOT_JS)


def wait_for(driver, predicate, what):
    """Polls the page (every 20 ms) until predicate(snapshot) holds; returns that snapshot."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    last = {}

    def check(d):
        nonlocal last
        last = snapshot(d)
        return last if predicate(last) else False

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.02).until(check)
    except TimeoutException:
        pytest.fail(f"page did not reach {what} within {WAIT:.0f} s; last state: {last}; "
                    f"browser log: {browser_log(driver)}", pytrace=False)


def check_served_page(base):
    """The server at base serves the page of this tree, with a CSP (so the test runs under it)."""
    for path, name in (("/", "index.html"), ("/app.js", "app.js"), ("/style.css", "style.css")):
        try:
            with urllib.request.urlopen(base + path, timeout=RPC_TIMEOUT) as resp:
                body, csp = resp.read(), resp.headers.get("content-security-policy")
        except OSError as e:
            pytest.fail(f"GET {base}{path}: {e} (is [web] on in this greeter binary?)", pytrace=False)
        if body != (WEB_DIR / name).read_bytes():
            pytest.fail(f"GET {base}{path} is not src/call/web/{name}: the binary embeds another page "
                        "(cargo build)", pytrace=False)
        if not csp or "script-src 'self'" not in csp:
            pytest.fail(f"GET {base}{path}: no CSP with script-src 'self' ({csp!r})", pytrace=False)


def open_page(driver, url, server):
    driver.get(url)  # returns after the load event: the deferred app.js has run
    field = driver.find_element("id", "server").get_attribute("value")
    assert field == server, f"#server prefilled with {field!r}, expected {server!r}"
    browser_log(driver)  # start each page's log afresh


def set_field(driver, field, value):
    """Sets an input's value with script: send_keys cannot type characters beyond the BMP."""
    driver.execute_script("arguments[0].value = arguments[1];",
                          driver.find_element("id", field), value)


def click_and_wait(driver, button):
    """Clicks #button and waits for the call it starts to end; returns the final snapshot."""
    # Mark the status first, so a previous call's "ok" cannot pass for this call's.
    driver.execute_script('document.getElementById("status").dataset.state = "clicked";')
    driver.find_element("id", button).click()
    return wait_for(driver, lambda s: s["state"] in ("ok", "error"), f"the end of the {button} call")


def say_hello(driver, name, token=""):
    set_field(driver, "name", name)
    set_field(driver, "token", token)
    return click_and_wait(driver, "say-hello")


def assert_ok(snap):
    assert (snap["state"], snap["code"], snap["status"]) == ("ok", "0", "OK"), snap


def assert_status(snap, code, name):
    assert snap["state"] == "error" and snap["code"] == str(code), snap
    assert snap["status"].startswith(f"{name} ({code})"), snap


# ---- the tests ------------------------------------------------------------------------------

def test_same_origin_reply_and_streamed_greetings(browser, greeter, greeter_stub):
    base = f"http://{greeter.addr}"
    check_served_page(base)
    open_page(browser, base + "/", server=base)

    snap = say_hello(browser, "browser")
    assert_ok(snap)
    assert snap["reply"] == "Hello, browser!" and snap["greetings"] == [], snap

    # Stream: the greetings must show one by one as their frames arrive, not all at the end.
    browser.execute_script("""
        window.arrivals = [];
        new MutationObserver(() => window.arrivals.push(performance.now()))
            .observe(document.getElementById("greetings"), { childList: true });
        document.getElementById("status").dataset.state = "clicked";""")
    browser.find_element("id", "stream").click()
    first = wait_for(browser, lambda s: s["state"] == "running" and 0 < len(s["greetings"]) < STREAM_GREETINGS,
                     "some but not all greetings while the stream runs")
    later = wait_for(browser, lambda s: len(s["greetings"]) > len(first["greetings"]),
                     "more greetings than at the first look")
    final = wait_for(browser, lambda s: s["state"] in ("ok", "error"), "the end of the stream")
    assert_ok(final)
    arrivals = browser.execute_script("return window.arrivals;")
    greetings = final["greetings"]
    assert len(greetings) == STREAM_GREETINGS, final
    assert greetings[0] == "Hello, browser!" and all(g.endswith(", browser!") for g in greetings), final
    assert final["reply"] == "", "outputs are cleared at the start of each call"
    assert first["greetings"] == greetings[:len(first["greetings"])], (first, final)
    assert later["greetings"] == greetings[:len(later["greetings"])], (later, final)
    # 10 greetings 100 ms apart: shown over most of ~900 ms, not in one burst.
    assert len(arrivals) >= 2 and arrivals[-1] - arrivals[0] >= 450, arrivals
    # Exactly what a gRPC (HTTP/2) client gets from the same server.
    expected = [r.message for r in greeter_stub.SayHelloStreamReply(pb.HelloRequest(name="browser"),
                                                                     timeout=RPC_TIMEOUT)]
    assert greetings == expected

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser-stream.png"
    shot.unlink(missing_ok=True)
    assert browser.save_screenshot(str(shot)), "screenshot failed"
    assert shot.stat().st_size > 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The page ran under the server's CSP without a violation, a failed load or a script error.
    log = browser_log(browser)
    assert not [line for line in log if line.startswith("SEVERE") or "Content Security Policy" in line], log


def test_names_and_error_statuses(browser, greeter, greeter_stub):
    base = f"http://{greeter.addr}"
    open_page(browser, base + "/", server=base)

    # UTF-8 beyond one byte per character, beyond the BMP, and over 127 bytes (a 2-byte varint).
    name = "Zoë 🌍 " + "ü" * 100
    assert len(name.encode()) > 127
    snap = say_hello(browser, name)
    assert_ok(snap)
    assert snap["reply"] == f"Hello, {name}!", snap

    # INVALID_ARGUMENT, its message percent-decoded: the same text a gRPC client gets.
    snap = say_hello(browser, "bell\u0007")
    assert_status(snap, 3, "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as err:
        greeter_stub.SayHello(pb.HelloRequest(name="bell\u0007"), timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert snap["status"] == f"INVALID_ARGUMENT (3): {err.value.details()}", snap
    assert snap["reply"] == "", snap


def test_tokens(browser, auth_greeter, tokens):
    base = f"http://{auth_greeter.addr}"
    open_page(browser, base + "/", server=base)

    snap = say_hello(browser, "browser")
    assert_status(snap, 16, "UNAUTHENTICATED")
    assert snap["reply"] == "", snap

    snap = say_hello(browser, "browser", token=tokens["reflection"])
    assert_status(snap, 7, "PERMISSION_DENIED")
    assert tokens["reflection"] not in snap["status"], "the status must not echo the token"

    snap = say_hello(browser, "browser", token=tokens["greeter"])
    assert_ok(snap)
    assert snap["reply"] == "Hello, browser!", snap

    snap = click_and_wait(browser, "stream")
    assert_ok(snap)
    assert len(snap["greetings"]) == STREAM_GREETINGS and snap["greetings"][0] == "Hello, browser!", snap


def test_cross_origin_allowed(browser, auth_greeter, tokens, other_origin):
    """The page from other_origin calls a server that allows it: CORS preflight with the
    authorization header, statuses readable, the stream streamed."""
    base = f"http://{auth_greeter.addr}"
    open_page(browser, f"{other_origin}/index.html?server={base}", server=base)

    snap = say_hello(browser, "browser")
    assert_status(snap, 16, "UNAUTHENTICATED")

    snap = say_hello(browser, "browser", token=tokens["greeter"])
    assert_ok(snap)
    assert snap["reply"] == "Hello, browser!", snap

    snap = click_and_wait(browser, "stream")
    assert_ok(snap)
    assert len(snap["greetings"]) == STREAM_GREETINGS and snap["greetings"][0] == "Hello, browser!", snap


def test_cross_origin_refused(browser, refusing_greeter, other_origin):
    """The same page against a server that allows only a look-alike origin: the browser refuses."""
    base = f"http://{refusing_greeter.addr}"
    open_page(browser, f"{other_origin}/index.html?server={base}", server=base)
    snap = say_hello(browser, "browser")
    assert snap["state"] == "error" and snap["code"] == "", snap
    assert snap["status"].startswith("network error:"), snap
    log = browser_log(browser)
    assert any("CORS policy" in line for line in log), log

    # Not a dead server: its own page, same origin, gets through.
    open_page(browser, base + "/", server=base)
    snap = say_hello(browser, "browser")
    assert_ok(snap)
    assert snap["reply"] == "Hello, browser!", snap
