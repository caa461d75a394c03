"""tuner.auth and tuner.audit without a server: password files, teams, who may do what, the audit log, the CLI.

The app-level checks (two users through gradio_client, a reviewer, the browser) are in tests/test_auth_app.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import audit, auth
from tuner.auth import ADMIN, MEMBER, REVIEWER, AuthError, User

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_login(monkeypatch):
    for name in ("TUNER_AUTH", "TUNER_TEAMS", "SPACE_ID", "OAUTH_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return auth.hash_password("alice-pw")


# -- password files ----------------------------------------------------------------------------------

BAD_LINES = [  # (the line, words the message must say)
    ("bob:hunter2", "not an argon2 hash"),  # a plain password: refused, it would be stored in clear
    ("bob $argon2id$v=19$m=65536,t=3,p=4$abc$def", "not `user:HASH`"),
    ("bob:$argon2id$v=19$m=65536,t=3,p=4$cut", "damaged"),
    (":$argon2id$v=19$m=65536,t=3,p=4$abc$def", "not `user:HASH`"),
]


@pytest.mark.parametrize(("line", "said"), BAD_LINES)
def test_a_password_file_with_a_bad_line_names_the_file_the_line_and_the_fix(tmp_path, monkeypatch, alice_hash,
                                                                             line, said):
    path = tmp_path / "passwords.txt"
    path.write_text(f"# the support team\nalice:{alice_hash}\n\n{line}\n")
    monkeypatch.setenv("TUNER_AUTH", f"@{path}")
    with pytest.raises(AuthError) as info:
        auth.login_check()
    message = str(info.value)
    assert f"{path}, line 4" in message and said in message, message
    assert "python -m tuner passwd USER" in message  # the fix
    assert "hunter2" not in message  # the message never repeats a password


def test_a_user_twice_in_the_password_file_is_named(tmp_path, monkeypatch, alice_hash):
    path = tmp_path / "passwords.txt"
    path.write_text(f"alice:{alice_hash}\nalice:{alice_hash}\n")
    monkeypatch.setenv("TUNER_AUTH", f"@{path}")
    with pytest.raises(AuthError, match=r"line 2: 'alice' is already on an earlier line"):
        auth.login_check()


def test_the_app_will_not_start_on_a_bad_password_file_and_says_which_line(tmp_path, alice_hash):
    path = tmp_path / "passwords.txt"
    path.write_text(f"alice:{alice_hash}\nbob:hunter2\n")
    env = {**os.environ, "TUNER_AUTH": f"@{path}", "TUNER_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, str(ROOT / "app.py")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert f"{path}, line 2" in done.stderr and "python -m tuner passwd USER" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_passwd_appends_a_salted_hash_that_signs_in_and_never_the_password(tmp_path, monkeypatch):
    path = tmp_path / "passwords.txt"
    for user, password in (("alice", "correct horse"), ("bob", "correct horse")):
        done = subprocess.run([sys.executable, "-m", "tuner", "passwd", user, "--file", str(path), "--password-stdin"],
                              input=password + "\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    text = path.read_text()
    assert "correct horse" not in text
    lines = text.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == ["alice", "bob"]
    assert all(ln.split(":", 1)[1].startswith("$argon2id$") for ln in lines)
    assert lines[0].split(":", 1)[1] != lines[1].split(":", 1)[1]  # salted: one password, two hashes
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("TUNER_AUTH", f"@{path}")
    check = auth.login_check()
    assert check("alice", "correct horse") and check("bob", "correct horse")
    assert not check("alice", "wrong") and not check("carol", "correct horse") and not check("alice", "")
    again = subprocess.run([sys.executable, "-m", "tuner", "passwd", "alice", "--file", str(path), "--password-stdin"],
                           input="other\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "already has a line for 'alice'" in again.stderr
    assert path.read_text() == text  # nothing appended


def test_inline_pairs_sign_in_several_users(monkeypatch):
    monkeypatch.setenv("TUNER_AUTH", "alice:pw1,bob:pw2")
    check = auth.login_check()
    assert check("alice", "pw1") and check("bob", "pw2")
    assert not check("alice", "pw2") and not check("carol", "pw1")
    monkeypatch.setenv("TUNER_AUTH", "alice:pw1,bob")
    with pytest.raises(AuthError, match="pair 2"):
        auth.login_check()


# -- teams, roles and what they may do ----------------------------------------------------------------

TEAMS = """
# who is in which team
support: alice, bob, carol (reviewer)
sales: dave, alice
admins: erin
"""


def test_the_teams_file_gives_teams_reviewers_and_admins(tmp_path, monkeypatch):
    path = tmp_path / "teams.txt"
    path.write_text(TEAMS)
    monkeypatch.setenv("TUNER_TEAMS", f"@{path}")
    monkeypatch.setenv("TUNER_AUTH", "x:y")
    t = auth.teams()
    assert t.teams_of("alice") == ("support", "sales") and t.teams_of("erin") == ()
    assert (t.role_of("carol"), t.role_of("alice"), t.role_of("erin")) == (REVIEWER, MEMBER, ADMIN)
    path.write_text("support alice, bob\n")  # changed while the server runs: read again, and refused
    os.utime(path, ns=(1, 1))
    with pytest.raises(AuthError, match=r"teams.txt, line 1: .* Fix: write the team's name, a colon"):
        auth.teams()
    with pytest.raises(AuthError, match=r"line 1: 'carol \(boss\)' is not a user name"):
        auth.parse_teams("support: carol (boss)")


ALICE = User("alice", ("support",), MEMBER)
CAROL = User("carol", ("support",), REVIEWER)
DAVE = User("dave", ("sales",), MEMBER)
ERIN = User("erin", (), ADMIN)
ALICES_RUN = {"name": "alice", "teams": ["support"]}
BOBS_RUN = {"name": "bob", "teams": ["support"]}  # a teammate's
LONE_RUN = {"name": "frank", "teams": []}  # someone in no team
LEGACY = None  # made before owners were recorded


@pytest.mark.parametrize(("user", "owner", "may"), [
    (ALICE, ALICES_RUN, set(auth.ACTIONS)),
    (ALICE, BOBS_RUN, set(auth.ACTIONS)),  # a team's runs are the team's
    (ALICE, LONE_RUN, set()),
    (ALICE, LEGACY, set()),
    (CAROL, BOBS_RUN, {"read", "chat", "judge"}),  # a reviewer: never train, export, publish or delete
    (DAVE, ALICES_RUN, set()),  # another team: nothing at all
    (ERIN, LONE_RUN, set(auth.ACTIONS)),
    (ERIN, LEGACY, set(auth.ACTIONS)),
    (None, ALICES_RUN, set()),  # nobody signed in
])
def test_who_may_do_what_with_a_run(user, owner, may):
    assert {a for a in auth.ACTIONS if auth.can(user, a, owner)} == may


def test_without_a_login_the_machine_user_may_do_everything_and_the_page_says_so(no_login):
    user = auth.current_user(None)
    assert user.name == auth.machine_user() and user.role == ADMIN
    assert all(auth.can(user, a, LEGACY) for a in auth.ACTIONS)  # old runs stay everyone's, as before
    assert "Nobody signs in on this server" in auth.whoami_words(user)


def test_with_a_login_nobody_signed_in_is_nobody(monkeypatch):
    monkeypatch.setenv("TUNER_AUTH", "alice:pw1")
    monkeypatch.delenv("TUNER_TEAMS", raising=False)

    class Anonymous:
        username = None

    assert auth.current_user(Anonymous()) is None
    assert "Sign in" in auth.whoami_words(None)


def test_a_space_visitor_is_their_hugging_face_name_and_organisations(no_login, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("SPACE_ID", "acme/tuner")
    monkeypatch.setenv("SYSTEM", "spaces")  # how gradio knows it runs on a Space (else it mocks the sign-in)
    for name, value in (("OAUTH_CLIENT_ID", "client"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):  # what a Space with hf_oauth sets
        monkeypatch.setenv(name, value)
        monkeypatch.setattr(f"gradio.oauth.{name}", value)  # gradio reads them once, when it is imported
    monkeypatch.setenv("TUNER_TEAMS", "reviewers: carol-hf (reviewer)")
    assert auth.mode() == "hf"
    profile = gr.OAuthProfile({"preferred_username": "alice-hf", "name": "Alice", "picture": "", "profile": "",
                               "orgs": [{"preferred_username": "acme-support", "name": "Acme support"}]})
    alice = auth.current_user(None, profile=profile)
    assert (alice.name, alice.teams, alice.role) == ("alice-hf", ("acme-support",), MEMBER)
    carol = auth.current_user(None, profile={"preferred_username": "carol-hf",
                                             "orgs": [{"preferred_username": "acme-support"}]})
    assert carol.role == REVIEWER and auth.can(carol, "judge", alice.owner_record())
    assert not auth.can(carol, "delete", alice.owner_record())
    assert auth.current_user(None) is None  # not signed in: no session, no profile
    # a team the teams file defines is the file's: an organisation of that name does not get into it
    monkeypatch.setenv("TUNER_TEAMS", "support: alice-hf")
    mallory = auth.current_user(None, profile={"preferred_username": "mallory", "name": "alice-hf",
                                               "orgs": [{"preferred_username": "support"}]})
    assert (mallory.name, mallory.teams) == ("mallory", ())
    assert auth.current_user(None, profile={"name": "alice-hf"}) is None  # a display name is not a user name
    monkeypatch.setenv("TUNER_TEAMS", "reviewers: carol-hf (reviewer)")
    # as a handler gets it: gradio's Request around Starlette's, the profile in the session OAuth left there
    import time

    from starlette.requests import Request as StarletteRequest

    def request(expires_at: float) -> gr.Request:
        info = {"userinfo": dict(profile), "expires_at": expires_at, "access_token": "x"}
        return gr.Request(request=StarletteRequest({"type": "http", "session": {"oauth_info": info}}))

    assert auth.current_user(request(time.time() + 600)) == alice
    assert auth.current_user(request(time.time() - 1)) is None  # an expired sign-in is no sign-in
    assert auth.current_user(gr.Request(request=StarletteRequest({"type": "http"}))) is None
    # the queue shows a teammate's name, and "another team" for anyone else's
    assert auth.sees(carol, "alice-hf") and not auth.sees(User("mallory", ("evil",)), "alice-hf")


def test_sees_tells_the_queue_whose_name_a_viewer_may_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_AUTH", "x:y")
    monkeypatch.setenv("TUNER_TEAMS", TEAMS.replace("\n", ";"))
    alice = User("alice", ("support", "sales"))  # as the teams file has her
    assert auth.sees(CAROL, "bob") and auth.sees(alice, "dave")  # a shared team
    assert not auth.sees(DAVE, "bob") and auth.sees(DAVE, "dave") and auth.sees(ERIN, "bob")
    monkeypatch.delenv("TUNER_AUTH")
    monkeypatch.delenv("TUNER_TEAMS")
    assert auth.sees(DAVE, "bob")  # no login: one person's server


# -- owners on disk and the audit log --------------------------------------------------------------------


def test_a_run_records_its_owner_and_old_runs_have_none(signoff_data, tmp_path, no_login):
    from tuner.config import TrainConfig
    from tuner.runs import Run, prepare_run

    mine = Run(prepare_run(TrainConfig.from_preset("quick"), signoff_data, tmp_path / "mine", owner=ALICE.owner_record()))
    assert mine.owner() == {"name": "alice", "teams": ["support"]}
    default = Run(prepare_run(TrainConfig.from_preset("quick"), signoff_data, tmp_path / "cli"))
    assert default.owner() == {"name": auth.machine_user(), "teams": []}  # the CLI's default: the machine's user
    default.owner_file.unlink()
    assert default.owner() is None  # a run made before this change


def test_the_train_command_takes_owner(monkeypatch):
    from tuner.cli import build_parser
    from tuner.train.cli import owner_of

    build_parser_args = build_parser("train").parse_args

    monkeypatch.setenv("TUNER_TEAMS", "support: alice")
    assert owner_of(build_parser_args(["train", "--data", "d", "--owner", "alice"])) == {"name": "alice",
                                                                                         "teams": ["support"]}
    assert owner_of(build_parser_args(["train", "--data", "d"]))["name"] == auth.machine_user()


def test_the_audit_log_only_grows_and_each_team_reads_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_HOME", str(tmp_path))
    audit.record("alice", "train", "run-a", ALICES_RUN, "quick preset")
    first = audit.audit_file().read_bytes()
    audit.record("dave", "delete", "run-d", {"name": "dave", "teams": ["sales"]})
    audit.record("bob", "export", "run-b", BOBS_RUN, "adapter (.zip)")
    audit.record("erin", "delete", "run-old", LEGACY)
    after = audit.audit_file().read_bytes()
    assert after.startswith(first) and after.count(b"\n") == 4  # appended, never rewritten
    seen = audit.entries(lambda owner: auth.sees_run(CAROL, owner))
    assert [(e["user"], e["action"], e["run"]) for e in seen] == [("bob", "export", "run-b"),
                                                                  ("alice", "train", "run-a")]
    assert [e["run"] for e in audit.entries(lambda owner: auth.sees_run(ERIN, owner))] == [
        "run-old", "run-b", "run-d", "run-a"]
    assert json.loads(after.splitlines()[0])["teams"] == ["support"]


def test_the_space_bundle_asks_for_hugging_face_sign_in_and_the_page_shows_the_button(no_login, monkeypatch):
    import re

    import gradio as gr

    meta = (ROOT / "README.md").read_text().split("---")[1]
    assert re.search(r"^hf_oauth: true$", meta, re.M)  # the Space sets OAUTH_CLIENT_ID and friends from this
    monkeypatch.setenv("SPACE_ID", "acme/tuner")
    monkeypatch.setenv("SYSTEM", "spaces")  # how gradio knows it runs on a Space (else it mocks the sign-in)
    for name, value in (("OAUTH_CLIENT_ID", "client"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):  # what a Space with hf_oauth sets
        monkeypatch.setenv(name, value)
        monkeypatch.setattr(f"gradio.oauth.{name}", value)  # gradio reads them once, when it is imported
    from tuner.ui.page import build_demo

    demo = build_demo()  # needs gradio[oauth] (requirements.txt)
    assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
    monkeypatch.delenv("OAUTH_CLIENT_ID")
    assert not any(isinstance(b, gr.LoginButton) for b in build_demo().blocks.values())  # no sign-in: no button
