"""Who is signed in, which team they are in, and what they may do with a run.

Three ways a server runs (`mode()`):

- "password": self-hosted behind Gradio's login page. `TUNER_AUTH="alice:pw1,bob:pw2"` (pairs separated
  by commas), or `TUNER_AUTH=@FILE` with one `user:HASH` a line, HASH an argon2 hash that
  `python -m tuner passwd USER` prints (a plain password is refused, with the line named).
- "hf": a Hugging Face Space with `hf_oauth: true` in its README metadata (the Space sets OAUTH_CLIENT_ID):
  "Sign in with Hugging Face"; the user's organisations are their teams (except a team the teams file
  names: that one is the file's alone).
- "none": neither. One person's server, as before: everyone who opens the page may do everything, and
  the page says so.

Teams (`TUNER_TEAMS=@FILE`, or the same lines inline separated by ';'):

    support: alice, bob, carol (reviewer)     # a team and its members; "(reviewer)" marks a reviewer
    sales: dave
    admins: erin                              # reserved: sees and manages every run

A run belongs to its owner and to the teams the owner was in when it was made (`Run.owner()`, written
at creation). Whoever shares one of those teams (or is the owner) sees the run; nobody else can list,
read, chat with, evaluate, judge, download, export, publish or delete it. Reviewers may read, chat and
judge, never train, export, publish or delete. Runs made before owners were recorded belong to nobody:
only admins see them when a login is on (everyone, when it is off). Light module: standard library
only; argon2 is imported when a password is checked or hashed.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hmac
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import TunerError

log = logging.getLogger("tuner.auth")

MEMBER, REVIEWER, ADMIN = "member", "reviewer", "admin"
ADMINS_TEAM = "admins"  # the teams file's reserved team: its members are admins
# what each role may do with a run it sees ("train" covers start, resume, cancel and training on feedback)
ACTIONS = ("read", "chat", "judge", "train", "export", "publish", "delete")
ROLE_ACTIONS = {MEMBER: frozenset(ACTIONS), REVIEWER: frozenset({"read", "chat", "judge"}), ADMIN: frozenset(ACTIONS)}
ACTION_WORDS = {"train": "train, resume or cancel", "export": "download or export", "publish": "publish",
                "delete": "delete", "judge": "judge", "chat": "chat with", "read": "read"}
HASH_PREFIX = "$argon2"
FIX_LINE = "Fix: make it `user:HASH`, with the line `python -m tuner passwd USER` prints."


class AuthError(TunerError):
    """A password or teams file that cannot be used (names the file, the line and the fix), or a refusal."""


@dataclass(frozen=True)
class User:
    """Someone using the page or the CLI: a name, the teams they are in, and a role (member, reviewer, admin)."""

    name: str
    teams: tuple[str, ...] = ()
    role: str = MEMBER

    def owner_record(self) -> dict[str, Any]:
        """What a run made by this user records as its owner (tuner.runs.Run.set_owner)."""
        return {"name": self.name, "teams": list(self.teams)}


# -- the server's mode ----------------------------------------------------------------------------


def mode() -> str:
    """"password" (TUNER_AUTH), "hf" (a Space with hf_oauth: true), or "none" (nobody signs in)."""
    if os.environ.get("TUNER_AUTH"):
        return "password"
    if os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID"):
        return "hf"
    return "none"


def machine_user() -> str:
    """The CLI's default owner: the machine's user name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return "local"


# -- teams ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teams:
    """The teams file, parsed: team -> members, who is a reviewer, who is an admin."""

    members: dict[str, tuple[str, ...]]
    reviewers: frozenset[str]
    admins: frozenset[str]

    def teams_of(self, name: str) -> tuple[str, ...]:
        return tuple(t for t, people in self.members.items() if name in people)

    def role_of(self, name: str) -> str:
        if name in self.admins:
            return ADMIN
        return REVIEWER if name in self.reviewers else MEMBER


NO_TEAMS = Teams({}, frozenset(), frozenset())


def parse_teams(text: str, where: str = "TUNER_TEAMS") -> Teams:
    """Lines `team: alice, bob, carol (reviewer)`; `admins: erin` names the admins; '#' starts a comment.

    >>> parse_teams("support: alice, carol (reviewer)").teams_of("carol")
    ('support',)
    """
    members: dict[str, list[str]] = {}
    reviewers: set[str] = set()
    admins: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        team, sep, names = line.partition(":")
        team = team.strip()
        if not sep or not team:
            raise AuthError(f"{where}, line {number}: {raw.strip()!r} is not `team: name, name (reviewer)`. Fix: "
                            "write the team's name, a colon, then its members separated by commas.")
        for entry in filter(None, (n.strip() for n in names.split(","))):
            name, _, mark = entry.partition("(")
            name, mark = name.strip(), mark.rstrip(")").strip().lower()
            if not name or " " in name or mark not in ("", REVIEWER):
                raise AuthError(f"{where}, line {number}: {entry!r} is not a user name, optionally followed by "
                                "'(reviewer)'. Fix: one name per comma, e.g. `support: alice, carol (reviewer)`.")
            if team == ADMINS_TEAM:
                admins.add(name)
            else:
                members.setdefault(team, []).append(name)
            if mark:
                reviewers.add(name)
    return Teams({t: tuple(p) for t, p in members.items()}, frozenset(reviewers), frozenset(admins))


def teams() -> Teams:
    """TUNER_TEAMS: `@FILE` (re-read when it changes), inline lines separated by ';', or no teams."""
    value = os.environ.get("TUNER_TEAMS", "").strip()
    if not value:
        return NO_TEAMS
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return _teams_file(str(path), path.stat().st_mtime_ns)
        except OSError as exc:
            raise AuthError(f"TUNER_TEAMS names {path}, which cannot be read ({exc.strerror}). Fix: give the path "
                            "of a teams file, e.g. TUNER_TEAMS=@/etc/tuner/teams.txt.") from None
    return parse_teams(value.replace(";", "\n"))


@functools.lru_cache(maxsize=4)
def _teams_file(path: str, _mtime_ns: int) -> Teams:
    return parse_teams(Path(path).read_text(encoding="utf-8"), where=path)


_seen_teams: dict[str, tuple[str, ...]] = {}  # on a Space: the organisations of each user seen signing in


def teams_of(name: str) -> tuple[str, ...]:
    """A user's teams: the teams file's, and on a Space the organisations they were last seen signing in with."""
    return tuple(dict.fromkeys((*teams().teams_of(name), *_seen_teams.get(name, ()))))


# -- who is signed in ----------------------------------------------------------------------------


def _profile_of(request: Any) -> dict[str, Any] | None:
    """The Hugging Face profile of a signed-in visitor, else None: gradio keeps it in the request's session
    (Starlette's scope, as gradio's own OAuthProfile parameter reads it), until it expires."""
    if request is None:
        return None
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else getattr(underlying, "session", None)
    info = (session or {}).get("oauth_info")
    if not isinstance(info, dict) or (info.get("expires_at") is not None and info["expires_at"] < time.time()):
        return None
    profile = info.get("userinfo")
    return profile if isinstance(profile, dict) else None


def user_from_profile(profile: dict[str, Any]) -> User | None:
    """A Space visitor from their OAuth profile: their Hub user name (never the display name, which anyone can
    choose), and their organisations as teams. A team the teams file defines is the file's alone: an
    organisation of the same name does not make its members part of it."""
    name = str(profile.get("preferred_username") or "")
    if not name:
        return None
    file = teams()
    orgs = tuple(str(o["preferred_username"]) for o in profile.get("orgs") or []
                 if isinstance(o, dict) and o.get("preferred_username") and o["preferred_username"] not in file.members)
    _seen_teams[name] = orgs
    return User(name, tuple(dict.fromkeys((*orgs, *file.teams_of(name)))), file.role_of(name))


def current_user(request: Any = None, profile: dict[str, Any] | None = None) -> User | None:
    """Who makes this request: the signed-in user, None when nobody is signed in although the server asks
    for it, or (no login on this server) the machine's user as an admin: one person's server, as before."""
    how = mode()
    if how == "none":
        return User(machine_user(), (), ADMIN)
    if how == "hf":
        profile = profile if profile is not None else _profile_of(request)
        return user_from_profile(profile) if profile else None
    name = getattr(request, "username", None)
    if not name:
        return None
    file = teams()
    return User(str(name), file.teams_of(str(name)), file.role_of(str(name)))


def whoami_words(user: User | None) -> str:
    """The page's line about who is signed in (and, without a login, that everyone shares everything)."""
    how = mode()
    if how == "none":
        return ("**Nobody signs in on this server**: everyone who opens this page sees and manages every run. "
                "To give each person or team their own runs, set `TUNER_AUTH` (README, *Self-hosting*).")
    if user is None:
        how_to = " with the *Sign in with Hugging Face* button." if how == "hf" else "."
        return "**Sign in** to see your team's runs" + how_to
    role = {REVIEWER: " as a **reviewer** (you may chat with and judge runs)", ADMIN: " as an **admin**"}.get(
        user.role, "")
    team = (f"; your team{'s' if len(user.teams) > 1 else ''}: {', '.join(user.teams)}" if user.teams
            else "; you are in no team, so you see your own runs only")
    return f"Signed in as **{user.name}**{role}{team}."


# -- what a user may do --------------------------------------------------------------------------


def sees_run(user: User, owner: dict[str, Any] | None) -> bool:
    """Whether `user` may know the run exists (list it, read it): its owner, a shared team, or an admin.
    A run without a recorded owner (made before owners were recorded) is seen by admins only."""
    if user.role == ADMIN:
        return True
    if not owner:
        return False
    return owner.get("name") == user.name or bool(set(owner.get("teams") or ()) & set(user.teams))


def can(user: User | None, action: str, owner: dict[str, Any] | None) -> bool:
    """Whether `user` may do `action` (one of ACTIONS) with a run whose owner record is `owner`."""
    if user is None or action not in ACTIONS:
        return False
    return sees_run(user, owner) and action in ROLE_ACTIONS.get(user.role, frozenset())


def allowed(user: User | None, action: str) -> bool:
    """Whether the user's role allows `action` at all (e.g. "train" for a new run)."""
    return user is not None and action in ROLE_ACTIONS.get(user.role, frozenset())


def refusal(user: User | None, action: str) -> str:
    """Why a role may not do `action`, in words, with what to do instead."""
    if user is None:
        return "Sign in first: this server shows runs to their team only."
    return (f"{user.name} is a reviewer: reviewers may chat with and judge runs, not "
            f"{ACTION_WORDS.get(action, action)} them. Fix: ask a member of the run's team.")


def sees(viewer: User, owner: str) -> bool:
    """Whether `viewer` may see the name `owner` (e.g. on a queued job): the same person, a shared team, an
    admin, or a server without login; else the page says "another team"."""
    if mode() == "none" or viewer.role == ADMIN or viewer.name == owner:
        return True
    return bool(set(teams_of(owner)) & set(viewer.teams))


# -- passwords ----------------------------------------------------------------------------------


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    """A salted argon2id hash of `password` (argon2-cffi's defaults), for a password file."""
    if not password:
        raise AuthError("An empty password cannot be used. Fix: type a password.")
    return _hasher().hash(password)


def parse_password_file(text: str, where: str) -> dict[str, str]:
    """`user:HASH` lines -> {user: hash}; '#' comments and blank lines are skipped. A bad line raises AuthError
    naming the file, the line and the fix (a plain password is a bad line: it would be stored in clear)."""
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        user, hashed = user.strip(), hashed.strip()
        if not sep or not user or not hashed or " " in user:
            raise AuthError(f"{where}, line {number}: not `user:HASH`. {FIX_LINE}")
        if not hashed.startswith(HASH_PREFIX):
            raise AuthError(f"{where}, line {number}: the part after '{user}:' is not an argon2 hash (a plain "
                            f"password must never be stored). {FIX_LINE}")
        try:
            extract_parameters(hashed)
        except (InvalidHashError, ValueError):
            raise AuthError(f"{where}, line {number}: the hash for '{user}' is damaged (cut or edited). "
                            f"{FIX_LINE}") from None
        if user in out:
            raise AuthError(f"{where}, line {number}: '{user}' is already on an earlier line. Fix: keep one line "
                            "per user.")
        out[user] = hashed
    if not out:
        raise AuthError(f"{where} holds no `user:HASH` line. {FIX_LINE}")
    return out


@functools.lru_cache(maxsize=4)
def _password_file(path: str, _mtime_ns: int) -> dict[str, str]:
    return parse_password_file(Path(path).read_text(encoding="utf-8"), where=path)


def _inline_pairs(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, pair in enumerate(filter(None, (p.strip() for p in value.split(","))), 1):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            raise AuthError(f"TUNER_AUTH, pair {n}: must look like user:password (pairs separated by commas), "
                            "or @FILE for a password file. Fix: e.g. TUNER_AUTH=alice:pw1,bob:pw2.")
        out[user.strip()] = password
    return out


def check_password(user: str, password: str) -> bool:
    """Gradio's `auth=` callable: whether `password` is `user`'s. The password file is re-read when it changes."""
    value = os.environ.get("TUNER_AUTH", "")
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            table = _password_file(str(path), path.stat().st_mtime_ns)
        except (OSError, AuthError) as exc:  # edited into a bad state while the server runs: nobody signs in
            log.error("password file unusable: %s", exc)
            return False
        hashed = table.get(user)
        from argon2.exceptions import VerificationError

        try:  # security: an unknown user costs a hash check too, so timing does not tell who exists
            ok = _hasher().verify(hashed or _dummy_hash(), password or "")
        except (VerificationError, ValueError):
            return False
        return ok and hashed is not None
    table = _inline_pairs(value)
    return hmac.compare_digest(table.get(user, "\x00" * 16).encode(), (password or "").encode()) and user in table


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher().hash("not a password of anyone")


def login_check() -> Callable[[str, str], bool] | None:
    """What app.py passes to Gradio's `auth=`: None without TUNER_AUTH. A password file is read now, so a bad
    line stops the server at start with the file, line and fix named (AuthError)."""
    value = os.environ.get("TUNER_AUTH", "")
    if not value:
        return None
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            _password_file(str(path), path.stat().st_mtime_ns)
        except OSError as exc:
            raise AuthError(f"TUNER_AUTH names {path}, which cannot be read ({exc.strerror}). Fix: create it with "
                            f"`python -m tuner passwd USER --file {path}`.") from None
    else:
        _inline_pairs(value)
    teams()  # a bad teams file is said at start too
    return check_password


# -- python -m tuner passwd USER -----------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="The user name to sign in with.")
    parser.add_argument("--file", help="Append the line to this password file (TUNER_AUTH=@FILE) instead of "
                                       "printing it.")
    parser.add_argument("--password-stdin", action="store_true",
                        help="Read the password from the first line of standard input (for scripts).")


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise AuthError("The two passwords differ. Fix: run the command again.")
    return first


def password_line(user: str, password: str) -> str:
    """One line of a password file: `user:HASH`."""
    if not user or ":" in user or any(c.isspace() for c in user) or user.startswith("#"):
        raise AuthError(f"{user!r} cannot be a user name: no spaces, no ':' and no leading '#'.")
    return f"{user}:{hash_password(password)}"


def cli(args: argparse.Namespace) -> int:
    line = password_line(args.user, _read_password(args.password_stdin))
    if not args.file:
        print(line)
        return 0
    path = Path(args.file).expanduser()
    if path.is_file():
        existing = _users_in(path.read_text(encoding="utf-8").splitlines())
        if args.user in existing:
            raise AuthError(f"{path} already has a line for '{args.user}'. Fix: delete that line first, then run "
                            "this again.")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    print(f"Added {args.user} to {path}. Start the app with TUNER_AUTH=@{path}.", file=sys.stderr)
    return 0


def _users_in(lines: Iterable[str]) -> set[str]:
    return {ln.split(":", 1)[0].strip() for ln in lines if ":" in ln and not ln.lstrip().startswith("#")}
