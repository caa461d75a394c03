"""A team on one server: users signed in through Gradio's login (TUNER_AUTH=@FILE, TUNER_TEAMS=@FILE), each
seeing their team's runs only, through the page's API (gradio_client) and in a real browser.

One app serves the module. Its runs are copies of the session's trained run (tests/conftest.py
`signoff_run`), one per owner, so nothing trains here:

    alice-run   alice, team support      bob-run    bob, team sales
    legacy-run  no owner (made before owners were recorded): admins only
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from app_server import running_app

from tuner import auth

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3", "erin": "erin-pw-4"}
TEAMS = "support: alice, carol (reviewer)\nsales: bob\nadmins: erin\n"
OWNERS = {"alice-run": {"name": "alice", "teams": ["support"]}, "bob-run": {"name": "bob", "teams": ["sales"]},
          "alice-spare": {"name": "alice", "teams": ["support"]}, "legacy-run": None}
TOKEN = "hf_USERtokenTUNERtest111111111111111111"
HISTORY = [{"role": "user", "content": "Hi, my lamp flickers."},
           {"role": "assistant", "content": "Let's fix that together. Stay sunny, the Lumen Lamps team."}]


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, signoff_run):
    from signoff_run import copy_run

    from tuner.runs import Run

    home = tmp_path_factory.mktemp("team_home")
    for run_id, owner in OWNERS.items():
        run = Run(copy_run(signoff_run, home / "runs" / run_id))
        if owner:
            run.set_owner(owner)
        else:
            run.owner_file.unlink(missing_ok=True)
        run.feedback_file.unlink(missing_ok=True)
    (home / "passwords.txt").write_text("".join(f"{u}:{auth.hash_password(p)}\n" for u, p in PASSWORDS.items()))
    (home / "teams.txt").write_text(TEAMS)
    env = {"TUNER_AUTH": f"@{home / 'passwords.txt'}", "TUNER_TEAMS": f"@{home / 'teams.txt'}",
           "GRADIO_IS_E2E_TEST": "1"}
    with running_app(home, home / "app.log", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def clients(team_server):
    from gradio_client import Client

    return {user: Client(team_server.url, auth=(user, pw), verbose=False, download_files=False)
            for user, pw in PASSWORDS.items()}


def listed(client) -> set[str]:
    """The run ids in the Runs tab's table, as the user's page shows it."""
    table = client.predict(None, api_name="/runs")[0]
    return {row[0] for row in table["data"]}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


def test_each_user_lists_their_teams_runs_and_admins_every_run(clients):
    assert listed(clients["alice"]) == {"alice-run", "alice-spare"}
    assert listed(clients["carol"]) == {"alice-run", "alice-spare"}  # alice's teammate (a reviewer)
    assert listed(clients["bob"]) == {"bob-run"}
    assert listed(clients["erin"]) == set(OWNERS)  # an admin: every run, the one without an owner too
    load = clients["bob"].predict(api_name="/load")
    assert "alice-run" not in json.dumps(load) and load[-1] == "bob"  # judgements are signed with the login
    assert "Signed in as **bob**" in load[5] and "sales" in load[5]
    assert "Signed in as **carol** as a **reviewer**" in clients["carol"].predict(api_name="/load")[5]


def _pref_settings() -> list:
    from tuner.config import PreferenceConfig
    from tuner.ui.runs_tab import PREF_SETTINGS

    values = PreferenceConfig().to_dict()
    return [values[n] for n in PREF_SETTINGS]


def _train_args() -> list:
    from tuner.ui.train_tab import MAIN_SETTINGS, MORE_SETTINGS, preset_values

    values = preset_values("quick")
    return ["default", "quick", *[values[n] for n in MAIN_SETTINGS + MORE_SETTINGS]]


RID = "alice-run"  # bob probes alice's run
# endpoint -> its arguments, the run id where it takes one
BY_RUN_ID = {
    "/status": [RID], "/poll": [RID], "/cancel": [RID], "/resume": [RID], "/run_details": [RID],
    "/feedback_report": [RID], "/export_feedback": [RID], "/train_on_feedback": [RID, *_pref_settings()],
    "/download_adapter": [RID], "/download_merged": [RID], "/download_gguf": [RID, "q8_0"],
    "/push": [RID, "bob/model", TOKEN, False, True], "/delete": [RID], "/publish": [RID, "t", False, "", ""],
    "/saved_evaluation": [RID], "/evaluate": [RID, 3, 8, 0.0, 0.9, 0, 1.1],
    "/chat": ["hello", RID, False, 8, 0.0, 0.9, 0, 1.1, "base"],
    "/rate_reply": [RID, "tuned", HISTORY, 1, True, ""], "/edit_reply": [RID, "tuned", HISTORY, 1, "Better.", ""],
    "/ab_pair": [RID, "base", "hello", 8, 0.0, 0.9, 0, 1.1, ""], "/ab_reset": [RID],
    "/import_feedback": [RID, None],  # the file is added in the test
}
# bob's own run with alice's beside it: the other run is checked too
BESIDE = {"/chat": ["hello", "bob-run", False, 8, 0.0, 0.9, 0, 1.1, RID],
          "/ab_pair": ["bob-run", RID, "hello", 8, 0.0, 0.9, 0, 1.1, ""],
          "/rate_reply": ["bob-run", RID, HISTORY, 1, True, ""]}
LISTS = {"/runs": [RID], "/playground_runs": [RID], "/load": [],  # answer with lists: never naming the run
         "/queue": []}  # the machine's queue: another team's rows without run ids (test_queue)
NO_RUN_ID = {"/sample", "/convert", "/example", "/estimate", "/model_memory", "/preset", "/train", "/clear_chat",
             "/ab_vote",  # take no run id (ab_vote's run is in the session's own state) ...
             "/new_session", "/new_chats", "/dict"}  # ... or nothing at all (a gr.State's starting value)


def test_every_api_name_refuses_another_teams_run_and_changes_nothing(clients, team_server, tmp_path):
    from gradio_client import handle_file

    bob, runs_dir = clients["bob"], team_server.home / "runs"
    api = set(bob.view_api(return_format="dict", print_info=False)["named_endpoints"])
    # a new endpoint must be sorted into one of these (and checked) before this test passes
    assert api == (set(BY_RUN_ID) - {"/poll"}) | set(LISTS) | NO_RUN_ID, api ^ (set(BY_RUN_ID) | set(LISTS) | NO_RUN_ID)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                 "chosen": [{"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    before, audit_before = snapshot(runs_dir), (team_server.home / "audit.jsonl").exists()
    for name, args in [*BY_RUN_ID.items(), *BESIDE.items()]:
        args = [handle_file(str(pairs)) if a is None else a for a in args]
        message = refused(bob, *args, api_name=name)
        # as if it did not exist (a judged column names no run of bob's: the words for any unknown column)
        assert f"There is no run named '{RID}'" in message or (
            name == "/rate_reply" and message.startswith(f"Unknown column '{RID}'")), (name, message)
    for name, args in LISTS.items():
        assert RID not in json.dumps(bob.predict(*args, api_name=name)), name
    assert snapshot(runs_dir) == before  # nothing written, moved or deleted
    assert (team_server.home / "audit.jsonl").exists() == audit_before  # and nothing done to audit
    assert TOKEN not in team_server.log()


def test_a_reviewer_chats_and_judges_but_never_trains_exports_publishes_or_deletes(clients, team_server):
    carol, run = clients["carol"], team_server.home / "runs" / "alice-run"
    assert "#### alice-run" in carol.predict("alice-run", api_name="/run_details")
    before = snapshot(run)
    for name, args in (("/delete", ["alice-run"]), ("/publish", ["alice-run", "t", False, "", ""]),
                       ("/push", ["alice-run", "carol/model", TOKEN, False, True]),
                       ("/download_adapter", ["alice-run"]), ("/download_merged", ["alice-run"]),
                       ("/export_feedback", ["alice-run"]), ("/train_on_feedback", ["alice-run", *_pref_settings()]),
                       ("/cancel", ["alice-run"]), ("/resume", ["alice-run"])):
        message = refused(carol, *args, api_name=name)
        assert "carol is a reviewer" in message and "ask a member of the run's team" in message, (name, message)
    assert snapshot(run) == before
    # starting a new run is training too (refused before the Data tab's session is even looked at)
    assert "carol is a reviewer" in refused(carol, *_train_args(), api_name="/train")
    saved = carol.predict("alice-run", "tuned", HISTORY, 1, True, "someone else", api_name="/rate_reply")
    assert saved.startswith("Saved: thumbs up")
    record = json.loads(run.joinpath("feedback.jsonl").read_text().splitlines()[-1])
    assert record["reviewer"] == "carol"  # the signed-in name, never the name typed


def test_the_audit_log_says_who_did_what_to_the_team_only(clients, team_server):
    alice, bob = clients["alice"], clients["bob"]
    log = team_server.home / "audit.jsonl"
    before = log.read_bytes() if log.exists() else b""
    alice.predict("alice-spare", api_name="/delete")
    assert not (team_server.home / "runs" / "alice-spare").exists()
    after = log.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1  # appended only
    entry = json.loads(after.splitlines()[-1])
    assert (entry["user"], entry["action"], entry["run"], entry["teams"]) == ("alice", "delete", "alice-spare",
                                                                            ["support"])
    audit_rows = lambda client: client.predict(None, api_name="/runs")[4]["data"]  # noqa: E731
    assert any(row[1:4] == ["alice", "delete", "alice-spare"] for row in audit_rows(clients["carol"]))
    assert not any("alice-spare" in json.dumps(row) for row in audit_rows(bob))  # another team's history


def raw_call(server, user: str, api_name: str, data: list) -> str:
    """Call an API name over plain HTTP as `user` (signed in through the login route), with `data` exactly as
    given: gradio_client would upload a local file named in a FileData itself, this sends only the path."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as http:
        http.post("/login", data={"username": user, "password": PASSWORDS[user]}).raise_for_status()
        event = http.post(f"/gradio_api/call/{api_name}", json={"data": data})
        event.raise_for_status()
        return http.get(f"/gradio_api/call/{api_name}/{event.json()['event_id']}").text


def test_nobody_reads_another_sessions_upload_through_the_api(team_server):
    import secrets

    # alice's page converted a file: her session's copy sits in her own upload folder on the server
    secret = team_server.home / "uploads" / secrets.token_hex(16) / "files" / "customers.jsonl"
    secret.parent.mkdir(parents=True)
    secret.write_text(json.dumps({"messages": [{"role": "user", "content": "SECRET-CARD 4111"},
                                               {"role": "assistant", "content": "ok"}]}) + "\n")
    named = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": "customers.jsonl"}
    answer = raw_call(team_server, "bob", "convert", [[named], "", False, [], "default"])
    assert "event: error" in answer and "SECRET-CARD" not in answer, answer
    assert f"Cannot move {secret} to the gradio cache dir because it was not uploaded by a user" in team_server.log()
    shown = raw_call(team_server, "bob", "example", [2, "default"])  # bob's own session has no examples
    assert "SECRET-CARD" not in shown and "event: complete" in shown, shown


def test_a_run_without_an_owner_is_for_admins_only(clients):
    assert "There is no run named 'legacy-run'" in refused(clients["alice"], "legacy-run", api_name="/run_details")
    assert "| owner | nobody" in clients["erin"].predict("legacy-run", api_name="/run_details")


# -- the browser ----------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_two_signed_in_pages_see_different_run_lists(team_server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            seen = {}
            for user in ("alice", "bob"):
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.goto(team_server.url)
                page.get_by_label("username").fill(user)
                page.get_by_label("password").fill(PASSWORDS[user])
                page.get_by_role("button", name="Login").click()
                page.get_by_role("tab", name="4. Runs").click()
                table = page.locator("#runs-table")
                expect(table).to_contain_text(f"{user}-run", timeout=60_000)
                expect(page.locator("#whoami")).to_contain_text(f"Signed in as {user}")
                page.screenshot(path=str(ARTIFACTS / f"auth-{user}-runs.png"), full_page=True)
                seen[user] = table.inner_text()
            assert "alice-run" in seen["alice"] and "bob-run" not in seen["alice"]
            assert "bob-run" in seen["bob"] and "alice-run" not in seen["bob"]
            assert "legacy-run" not in seen["alice"] + seen["bob"]
        finally:
            browser.close()
