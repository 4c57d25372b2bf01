"""The edit console at /console in a real headless Chromium: the list, the detail page, "try it",
rollback with a reason, the API key, and data shown as text."""

from __future__ import annotations

import json

from playwright.sync_api import Page, expect

from tests.console.conftest import OTHER, PROMPT, REPHRASE, TARGET, Served
from tests.service.conftest import wait_for


def _row(page: Page, edit_id: str):
    return page.locator(f'#edits tr[data-edit-id="{edit_id}"]')


def test_page_is_self_contained(http, served: Served):
    r = http.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script type=\"module\" src=\"/console/static/main.js\"></script>" in r.text
    assert 'src="http' not in r.text and 'href="http' not in r.text  # nothing from elsewhere
    for asset in ("main.js", "api.js", "dom.js", "list.js", "detail.js", "tryit.js", "console.css"):
        assert http.get(f"/console/static/{asset}").status_code == 200
    assert http.get("/console/static/../__init__.py").status_code == 404


def test_list_shows_the_live_edit(page: Page, served: Served):
    page.goto(served.url())
    row = _row(page, served.edit_id)
    expect(row.locator(".badge")).to_have_text("active")
    expect(row.get_by_role("link", name=PROMPT)).to_be_visible()
    expect(row.locator("td.target")).to_have_text(TARGET)
    expect(row.locator("td.metrics")).to_contain_text("activation")
    expect(page.locator("#list-summary")).to_contain_text("newest first")


def test_search_filters_the_list(page: Page, served: Served, http):
    page.goto(served.url())
    page.get_by_label("Prompt or target contains").fill("ceo of ACME")
    page.get_by_label("Status").select_option("active")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(served.url("#/?q=ceo+of+ACME&status=active"))
    expect(_row(page, served.edit_id)).to_be_visible()
    page.get_by_label("Prompt or target contains").fill("nothing says this")
    page.get_by_label("Prompt or target contains").press("Enter")
    expect(page.locator("#list-summary")).to_have_text("No edits match.")
    expect(page.locator("#edits tbody tr")).to_have_count(0)
    # Filtering by actor is offered once the service has it.
    has_actor = any(p["name"] == "actor" for p in http.get("/openapi.json").json()["paths"]["/edits"]["get"].get(
        "parameters", []))
    if has_actor:
        expect(page.get_by_label("Changed by")).to_be_visible()
    else:
        expect(page.get_by_label("Changed by")).to_be_hidden()


def test_try_it_shows_the_edit_that_answered(page: Page, served: Served, http):
    expected = http.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 32}).json()
    assert expected["routing"]["edit_id"] == served.edit_id
    page.goto(served.url())
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#try-routed")).to_contain_text(served.edit_id)
    expect(page.locator("#try-routed")).to_contain_text(f"{PROMPT} \u2192 {TARGET}")
    expect(page.locator("#try-text")).to_have_text(expected["text"])
    assert expected["text"].startswith(TARGET)
    activation = float(page.locator("#try-activation").inner_text())
    assert abs(activation - expected["routing"]["activation"]) < 1e-3

    page.get_by_label("Prompt", exact=True).fill(OTHER)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#try-routed")).to_have_text("the base model (no edit fired)")

    expect(page.locator("#try-routed").get_by_role("link")).to_have_count(0)
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Generate").click()
    page.locator("#try-routed").get_by_role("link").click()
    expect(page.locator("#detail-view")).to_be_visible()
    expect(page).to_have_url(served.url(f"#/edits/{served.edit_id}"))


def test_detail_shows_rephrases_activations_and_events(page: Page, served: Served, http):
    edit = http.get(f"/edits/{served.edit_id}").json()
    page.goto(served.url())
    _row(page, served.edit_id).get_by_role("link", name=PROMPT).click()
    expect(page.locator("#detail-title")).to_be_focused()
    rows = page.locator("table.activations tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(1)).to_contain_text(REPHRASE)
    expect(rows.nth(1).locator("td").last).to_have_text(
        str(round(edit["metrics"]["rephrase_activations"][0], 3)).rstrip("0"))
    expect(page.locator("#rollback")).to_be_visible()
    # Events appear exactly when the service has the endpoint.
    has_events = http.get(f"/edits/{served.edit_id}/events").status_code == 200
    expect(page.locator("#events")).to_have_count(1 if has_events else 0)
    page.get_by_role("link", name="All edits").click()
    expect(page.locator("#list-view")).to_be_visible()


def test_rollback_from_the_page(page: Page, served: Served, http):
    edit_id = http.post("/edits", json={"prompt": "Who is the CEO of Initech?", "target": "Bill Lumbergh"}).json()["id"]
    assert wait_for(lambda: http.get(f"/edits/{edit_id}").json()["live"], 60)
    page.goto(served.url())
    _row(page, edit_id).get_by_role("link").click()
    expect(page.locator("#detail .fields .badge")).to_have_text("active")
    page.locator("#rollback").click()
    expect(page.locator("#action-message")).to_have_text("Give a reason first.")
    assert http.get(f"/edits/{edit_id}").json()["status"] == "active"

    page.get_by_label("Reason").fill("wrong CEO, ticket OPS-7")
    with page.expect_request(lambda r: r.url.endswith(f"/edits/{edit_id}/rollback")) as request:
        page.locator("#rollback").click()
    assert json.loads(request.value.post_data or "{}") == {"reason": "wrong CEO, ticket OPS-7"}
    expect(page.locator("#detail .fields .badge")).to_have_text("rolled back")
    expect(page.get_by_role("status")).to_have_text("Rollback done.")
    expect(page.locator("#rollback")).to_have_count(0)
    assert http.get(f"/edits/{edit_id}").json()["status"] == "rolled_back"
    page.get_by_role("link", name="All edits").click()
    expect(_row(page, edit_id).locator(".badge")).to_have_text("rolled back")


def test_user_text_is_shown_as_text(page: Page, served: Served, http):
    target = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    prompt = "Who founded <b>Globex</b>?"
    edit_id = http.post("/edits", json={"prompt": prompt, "target": target, "rephrases": ["<i>Globex</i> founder?"],
                                        "metadata": {"note": "<script>alert(1)</script>"}}).json()["id"]
    # Cancelled at once: shown all the same, and the worker stays free.
    http.post(f"/edits/{edit_id}/rollback", json={"reason": "<script>window.pwned = 4</script>"})
    page.goto(served.url())
    row = _row(page, edit_id)
    expect(row.locator("td.target")).to_have_text(target)
    expect(row.get_by_role("link")).to_have_text(prompt)
    assert row.locator("script, img, b").count() == 0
    row.get_by_role("link").click()
    expect(page.locator("#detail .fields .target")).to_have_text(target)
    expect(page.locator("table.activations")).to_contain_text("<i>Globex</i> founder?")
    expect(page.locator("#detail pre.json")).to_contain_text("<script>alert(1)</script>")
    assert page.locator("#detail script, #detail img, #detail b, #detail i").count() == 0
    assert page.evaluate("window.pwned") is None


def test_api_key_is_kept_for_the_session_and_refusals_explained(page: Page, served: Served):
    page.goto(served.url())
    expect(page.locator("#key-state")).to_have_text("no key")
    page.get_by_label("API key").fill("sk-test-1")
    with page.expect_request(lambda r: "/edits?" in r.url) as request:
        page.get_by_role("button", name="Use key").click()
    assert request.value.headers.get("authorization") == "Bearer sk-test-1"
    expect(page.locator("#key-state")).to_have_text("key set for this browser session")
    expect(page.get_by_label("API key")).to_have_value("")  # not left on the page
    assert page.evaluate("sessionStorage.getItem('scen-console-api-key')") == "sk-test-1"

    # The key outlives a reload; a service that refuses it is explained.
    page.route("**/edits?*", lambda route: route.fulfill(
        status=401, content_type="application/json",
        body=json.dumps({"error": "unknown API key", "error_type": "unauthorized"})))
    with page.expect_request(lambda r: "/edits?" in r.url) as request:
        page.reload()
    assert request.value.headers.get("authorization") == "Bearer sk-test-1"
    expect(page.get_by_role("alert")).to_contain_text("(401): unknown API key")
    page.get_by_role("button", name="Enter a key").click()
    expect(page.get_by_label("API key")).to_be_focused()

    page.route(f"**/edits/{served.edit_id}/rollback", lambda route: route.fulfill(
        status=403, content_type="application/json",
        body=json.dumps({"error": "rolling back needs the admin role", "error_type": "forbidden"})))
    page.goto(served.url(f"#/edits/{served.edit_id}"))
    page.get_by_label("Reason").fill("test")
    page.locator("#rollback").click()
    expect(page.get_by_role("alert")).to_contain_text("not allowed")
    expect(page.locator("#action-message")).to_contain_text("rolling back needs the admin role")

    page.get_by_role("button", name="Forget").click()
    assert page.evaluate("sessionStorage.getItem('scen-console-api-key')") is None


def test_events_and_restore_when_the_service_has_them(page: Page, served: Served, http):
    """Until the service answers GET /edits/{id}/events and lists POST /edits/{id}/restore, the page
    hides both; here the browser is given those answers."""
    edit_id = http.post("/edits", json={"prompt": "Who is the CEO of Hooli?", "target": "Gavin Belson"}).json()["id"]
    http.post(f"/edits/{edit_id}/rollback", json={"reason": "setup"})
    events = [{"id": 1, "edit_id": edit_id, "event": "created", "status": "queued", "actor": "ops",
               "at": "2024-05-01T10:00:00Z", "reason": None},
              {"id": 2, "edit_id": edit_id, "event": "rolled_back", "status": "rolled_back", "actor": "ops",
               "at": "2024-05-01T10:05:00Z", "reason": "<script>window.pwned = 3</script>"}]
    restored: list[dict] = []
    page.route(f"**/edits/{edit_id}/events", lambda route: route.fulfill(json=events))
    page.route("**/openapi.json", lambda route: route.fulfill(json={"paths": {
        "/edits": {"get": {"parameters": [{"name": "actor", "in": "query"}]}},
        "/edits/{edit_id}/restore": {"post": {}}}}))

    def restore(route):
        restored.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(json=http.get(f"/edits/{edit_id}").json())

    page.route(f"**/edits/{edit_id}/restore", restore)
    page.goto(served.url())
    page.get_by_label("Changed by").fill("ops")
    with page.expect_request(lambda r: "/edits?" in r.url) as request:
        page.get_by_role("button", name="Search").click()
    assert "actor=ops" in request.value.url
    page.goto(served.url(f"#/edits/{edit_id}"))
    items = page.locator("#events li")
    expect(items).to_have_count(2)
    expect(items.nth(1)).to_contain_text("rolled_back")
    expect(items.nth(1)).to_contain_text("reason: <script>window.pwned = 3</script>")
    page.get_by_label("Reason").fill("it was right after all")
    page.get_by_role("button", name="Restore").click()
    expect(page.get_by_role("status")).to_have_text("Restore done.")
    assert restored == [{"reason": "it was right after all"}]
    assert page.evaluate("window.pwned") is None
