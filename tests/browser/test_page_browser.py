"""The gateway's page at `/` in a real headless Chromium against a real tritonserver and gateway
(the tiny checkpoint): generate with live previews into the gallery, steer mid-run and see the
steer acknowledged then applied, cancel, download a PNG carrying its parameters, and an
inpainting edit from an uploaded image and a painted mask. Every wait is on the page's state
(a selector or a condition), never a sleep."""

import base64
import io
import json
import re
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from tests.support.page_browser import (
    TIMEOUT_MS,
    chromium,
    missing,
    open_page,
    page_errors,
    previews,
    set_range,
    start,
    wait_for_step,
)
from tests.support.server_metrics import idle_metrics, metrics, wait_for
from serving.client.kserve import LdmClient
from serving.gateway import images

PROMPT = "a large red circle on the left of a black background"
STEERED = "a small blue square at the top right"
# 64x64 and 150 steps: a run of seconds on the tiny checkpoint, long enough to act on mid-run
LONG = dict(steps=150, size="64x64")

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@pytest.fixture
def page(browser, gateway):
    page = open_page(browser, gateway.rest_url + "/")
    yield page
    errors = page_errors(page)
    page.context.close()
    assert errors == []
    elsewhere = [u for u in page.requested if not u.startswith((gateway.rest_url + "/", "data:", "blob:"))]
    assert elsewhere == []  # nothing from another origin


def png_texts(data: bytes) -> dict:
    """The tEXt/iTXt chunks of a PNG, each chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    texts, offset, types = {}, 8, []
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in the {kind} chunk"
        types.append(kind)
        if kind == b"tEXt":
            key, text = body.split(b"\0", 1)
            texts[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            texts[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[2].decode()
        offset += 12 + length
    assert types[-1] == b"IEND"
    return texts


def wait_until_finished(page) -> None:
    """Until the page's generation has ended (done, failed or cancelled)."""
    page.wait_for_function("!document.body.classList.contains('running')")


def surface_box(page) -> dict:
    """Where the drawing surface is in the viewport now (focusing a region's prompt may scroll)."""
    surface = page.locator("#regions_view")
    surface.scroll_into_view_if_needed()
    return surface.bounding_box()


def download(page, card) -> bytes:
    with page.expect_download() as info:
        card.locator(".download").click()
    return open(info.value.path(), "rb").read()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_shows_previews_then_the_result_in_the_gallery_and_downloads_it_with_its_parameters(page, server):
    start(page, PROMPT, seed=11, steps=24, guidance=5.0, size="32x32")
    card = page.locator("#gallery .card").first
    card.wait_for()
    assert page.text_content("#status").startswith("done")
    shown = previews(page)
    assert len(set(shown[:-1])) >= 3  # previews every 2 steps, each a new picture, then the result
    data = download(page, card)
    params = json.loads(png_texts(data)["ldm-serving"])
    assert params["prompt"] == PROMPT and params["seed"] == 11 and params["steps"] == 24
    assert params["guidance_scale"] == 5.0 and params["size"] == "32x32"
    assert png_texts(data)["parameters"].startswith(PROMPT + "\nSteps: 24, Sampler: DDIM, CFG scale: 5, Seed: 11")
    with LdmClient(server.grpc_url) as kserve:
        expected = kserve.generate(PROMPT, seed=11, steps=24, guidance_scale=5.0, height=32, width=32)
    np.testing.assert_array_equal(pixels(data), expected)
    assert card.locator("dd").all_text_contents()[:2] == [PROMPT, "24"]


def test_the_sampler_menu_lists_the_samplers_and_a_generation_uses_the_chosen_one(page, server):
    page.wait_for_selector("#sampler[data-loaded=true]", state="attached")
    options = page.eval_on_selector_all("#sampler option", "os => os.map(o => [o.value, o.textContent, o.disabled])")
    assert options[0] == ["", "server default (DDIM)", False]
    disabled = {value: off for value, _, off in options}
    # A1111's names, and ours for a sampler without one; flow matching does not fit this model
    assert {"DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "UniPC", "LCM"} <= set(disabled)
    assert disabled.pop("flow_match_euler") is True and not any(disabled.values())
    page.select_option("#sampler", "DPM++ 2M Karras")
    with page.expect_request(lambda r: r.url.endswith("/v1/generations") and r.method == "POST") as sent:
        start(page, PROMPT, seed=9, steps=12, guidance=5.0, size="32x32")
    card = page.locator("#gallery .card").first
    card.wait_for()
    assert json.loads(sent.value.post_data)["sampler"] == "DPM++ 2M Karras"
    data = download(page, card)
    assert json.loads(png_texts(data)["ldm-serving"])["sampler"] == "DPM++ 2M Karras"
    assert "Steps: 12, Sampler: DPM++ 2M Karras, CFG scale: 5" in png_texts(data)["parameters"]
    with LdmClient(server.grpc_url) as kserve:
        expected = kserve.generate(
            PROMPT,
            seed=9,
            steps=12,
            guidance_scale=5.0,
            height=32,
            width=32,
            sampler="dpmpp_2m",
            sigma_schedule="karras",
        )
    np.testing.assert_array_equal(pixels(data), expected)


def test_editing_the_prompt_mid_run_steers_it_and_the_page_shows_the_steer_applied(page, server):
    start(page, PROMPT, seed=3, guidance=7.5, **LONG)
    wait_for_step(page, 3)
    page.fill("#prompt", STEERED)  # one input event; the page sends the steer 300 ms after the last one
    wait_until_finished(page)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
    log = page.locator("#steers li").all_text_contents()
    assert len(log) == 1 and log[0].startswith("steer 1 applied at step ") and STEERED in log[0], log
    applied_at = int(log[0].split("applied at step ")[1].split()[0])
    assert 3 <= applied_at < 150
    card = page.locator("#gallery .card").first
    data = download(page, card)
    params = json.loads(png_texts(data)["ldm-serving"])
    assert params["steers"] == [{"steer_id": 1, "step": applied_at, "prompt": STEERED}]
    with LdmClient(server.grpc_url) as kserve:
        unsteered = kserve.generate(PROMPT, seed=3, steps=150, guidance_scale=7.5, height=64, width=64)
    assert not np.array_equal(pixels(data), unsteered)


def test_moving_the_guidance_slider_mid_run_steers_the_guidance(page):
    start(page, PROMPT, seed=4, guidance=7.5, **LONG)
    wait_for_step(page, 3)
    set_range(page, "#guidance_scale", 8, 9, 10)  # a drag: several input events at once, one steer after the last
    wait_until_finished(page)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
    log = page.locator("#steers li").all_text_contents()
    assert len(log) == 1 and re.fullmatch(r"steer 1 applied at step \d+ \(guidance_scale: 10\)", log[0]), log


def test_cancel_stops_the_run(page, server):
    # earlier tests' generations are gone (and counted: the metrics are copied all at once)
    before = idle_metrics(server)["ldm_cancellations_total"]
    start(page, PROMPT, seed=5, **LONG)
    wait_for_step(page, 2)
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.click("#cancel")
    assert deleted.value.status == 200 and deleted.value.json()["status"] == "cancelled"
    page.wait_for_selector("#status[data-state=cancelled]")
    step = int(page.text_content("#status").removeprefix("cancelled at step "))
    assert step < 150
    assert page.locator("#gallery .card").count() == 0 and page.is_enabled("#generate")
    assert wait_for(lambda: metrics(server)["ldm_cancellations_total"] == before + 1)
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)


def test_a_bad_field_shows_the_servers_error_naming_it(page):
    start(page, PROMPT, size="36x32")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("size: ") and "multiple of 8" in page.text_content("#error")
    assert page.get_attribute("#size", "class") == "invalid" and page.is_enabled("#generate")


def test_init_image_and_a_painted_mask_make_an_inpainting_edit(page, server, tmp_path):
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[:, :16] = (200, 30, 30)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    page.click("#image_panel summary")
    page.set_input_files("#init_image", str(tmp_path / "photo.png"))
    page.wait_for_function("document.getElementById('picture').width === 32")
    set_range(page, "#strength", 0.8)
    set_range(page, "#brush", 64)
    box = surface_box(page)  # paint a stroke down the right half
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + 4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] - 4, steps=8)
    page.mouse.up()
    with page.expect_request(lambda r: r.url.endswith("/v1/generations") and r.method == "POST") as sent:
        start(page, PROMPT, seed=9, steps=12, guidance=7.5)
    page.locator("#gallery .card").first.wait_for()
    body = json.loads(sent.value.post_data)
    assert body["strength"] == 0.8
    init = images.Upload(base64.b64decode(body["init_image"]), "init_image").decode()
    mask = images.Upload(base64.b64decode(body["mask"]), "mask", mask=True).decode()
    np.testing.assert_array_equal(init, picture)
    assert mask[:, 24].min() == 255 and mask[:, :16].max() == 0  # the stroke is repainted, the left half kept
    data = download(page, page.locator("#gallery .card").first)
    with LdmClient(server.grpc_url) as kserve:
        expected = kserve.generate(
            PROMPT, seed=9, steps=12, guidance_scale=7.5, init_image=init, mask=mask, strength=0.8
        )
    np.testing.assert_array_equal(pixels(data), expected)


def test_rectangles_drawn_with_prompts_are_sent_as_region_masks(page, server):
    page.fill("#size", "32x32")
    page.dispatch_event("#size", "change")  # the drawing surface takes the size
    page.click("#image_panel summary")
    page.check("input[name=tool][value=region]")
    for left, prompt in ((0, "a red circle"), (16, "a blue square")):  # the left and the right half
        box = surface_box(page)  # CSS 256 px for 32 image pixels: 8 px each
        page.mouse.move(box["x"] + left * 8 + 1, box["y"] + 1)
        page.mouse.down()
        page.mouse.move(box["x"] + (left + 16) * 8 - 1, box["y"] + box["height"] - 1, steps=4)
        page.mouse.up()
        page.locator("#regions .region-prompt").last.fill(prompt)
    with page.expect_request(lambda r: r.url.endswith("/v1/generations") and r.method == "POST") as sent:
        start(page, PROMPT, seed=6, steps=10, guidance=5.0, size="32x32")
    wait_until_finished(page)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#error")
    regions = json.loads(sent.value.post_data)["regions"]
    assert [r["prompt"] for r in regions] == ["a red circle", "a blue square"]
    masks = np.stack([images.Upload(base64.b64decode(r["mask"]), "regions.mask", mask=True).decode() for r in regions])
    assert (masks[0][:, :16] == 255).all() and (masks[0][:, 16:] == 0).all()
    assert (masks[1][:, 16:] == 255).all() and (masks[1][:, :16] == 0).all()
    data = download(page, page.locator("#gallery .card").first)
    assert json.loads(png_texts(data)["ldm-serving"])["regions"] == ["a red circle", "a blue square"]
    with LdmClient(server.grpc_url) as kserve:
        expected = kserve.generate(
            PROMPT,
            seed=6,
            steps=10,
            guidance_scale=5.0,
            height=32,
            width=32,
            region_prompts=["a red circle", "a blue square"],
            region_masks=masks,
        )
    np.testing.assert_array_equal(pixels(data), expected)


# What a page on another origin can send without asking the gateway first ("simple" requests:
# no preflight), and one JSON request that needs a preflight; each outcome as the page sees it.
CROSS_ORIGIN = """async (gateway) => {
  const body = JSON.stringify({prompt: "a red circle", steps: 150, n: 8, size: "64x64"});
  const form = new FormData();
  form.append("prompt", "a red circle");
  form.append("image", new Blob([new Uint8Array([137, 80, 78, 71])], {type: "image/png"}), "x.png");
  const tries = [
    ["/v1/images/generations", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}],
    ["/v1/generations", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}],
    ["/v1/images/edits", {method: "POST", mode: "no-cors", body: form}],
    ["/v1/images/generations", {method: "POST", headers: {"Content-Type": "application/json"}, body}],
  ];
  const outcomes = [];
  for (const [path, init] of tries) {
    try { outcomes.push((await fetch(gateway + path, init)).type); } catch (e) { outcomes.push("refused"); }
  }
  return outcomes;
}"""


@pytest.fixture
def other_origin():
    """A page at another origin on this machine (another port: another local web app, or a page
    the user opened), served for real: a page the browser gets from a public or unknown address
    is stopped by its own guard for local addresses (Local Network Access) before the gateway's
    guard is reached."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<p>elsewhere</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()
    server.server_close()


def test_a_page_from_another_origin_cannot_start_a_generation(browser, gateway, server, other_origin):
    before = idle_metrics(server)
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    answered = []  # what the gateway answered, which the page itself may not read
    page.on("response", lambda response: answered.append((response.request.method, response.url, response.status)))
    page.goto(other_origin)
    outcomes = page.evaluate(CROSS_ORIGIN, gateway.rest_url)
    context.close()
    # the simple requests reached the gateway and were refused for their Origin; the JSON one
    # never left the browser (its preflight got no CORS grant)
    assert outcomes == ["opaque", "opaque", "opaque", "refused"], outcomes
    posts = [(url.removeprefix(gateway.rest_url), status) for method, url, status in answered if method == "POST"]
    assert posts == [("/v1/images/generations", 403), ("/v1/generations", 403), ("/v1/images/edits", 403)], answered
    after = idle_metrics(server)
    assert after["ldm_unet_steps_total"] == before["ldm_unet_steps_total"]
    assert after["ldm_images_completed_total"] == before["ldm_images_completed_total"]


def test_the_page_runs_under_its_content_security_policy(browser, gateway):
    """Without bypassing the CSP, and waiting on selectors only: a generation reaches the gallery
    and the page reports no violation (OBSERVE records them as errors)."""
    page = open_page(browser, gateway.rest_url + "/", bypass_csp=False)
    start(page, PROMPT, seed=9, steps=4, size="32x32")
    page.wait_for_selector("#gallery .card")
    errors = page_errors(page)
    page.context.close()
    assert errors == []


def test_the_api_page_runs_its_inline_script_under_its_policy(browser, gateway):
    """/docs allows its own inline script and style by hash: it renders the document, and the
    browser reports no refusal."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    console = []
    page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
    page.goto(gateway.rest_url + "/docs")
    page.wait_for_selector("#paths h2")
    colour = page.eval_on_selector("h2 .method", "el => getComputedStyle(el).color")  # the inline style's white
    context.close()
    assert console == [] and colour == "rgb(255, 255, 255)"
