"""What the ownership checks add to the page: the Runs tab's refresh handler on 200 runs, with and without.

    python bench/ownership.py [--runs 200] [--repeats 30] [--json]

Makes a temporary TUNER_HOME with `--runs` run folders (config.yaml, status.json, owner.json; owners spread
over 10 teams of 4), then times `tuner.ui.runs_tab.refresh_runs` (what the Refresh button and a page load do:
list, table, pickers, audit log) as the page calls it:

- without checks: no login (TUNER_AUTH unset): one person's server, every run listed;
- with checks, same list: TUNER_AUTH and TUNER_TEAMS set, signed in as a member of every team (each of the
  200 runs checked and listed: the same table as without checks);
- with checks, one team: a member of one team (20 of the 200 runs listed);

and, on its own, reading the 200 owner.json files (`Run.owner`), the one file the checks add per run.
Prints the medians in milliseconds. Light: no model, no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEAMS, PER_TEAM = 10, 4


def make_runs(home: Path, n: int) -> None:
    from tuner.config import TrainConfig
    from tuner.runs import Run, update_status, write_json_atomic

    cfg = TrainConfig.from_preset("quick")
    for i in range(n):
        run = Run(home / "runs" / f"run-{i:04d}")
        run.data_dir.mkdir(parents=True)
        cfg.save(run.config_file)
        write_json_atomic(run.sources_file, {"train.jsonl": {"examples": 40}})
        update_status(run.path, status="completed", step=10, max_steps=10, train_loss=1.2, eval_loss=1.1,
                      first_eval_loss=2.0, created_at="2026-12-02T14:00:00+0000")
        team = i % TEAMS
        run.set_owner({"name": f"user{team}-{i % PER_TEAM}", "teams": [f"team{team}"]})


class Signed:
    """What the handler reads of gradio's request: the name the login page signed in."""

    def __init__(self, username: str | None):
        self.username = username


def medians_ms(cases: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each case; the cases alternate (a busy machine slows all alike). A case is
    (environment to set, function)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(repeats + 1):  # the first round warms imports and caches
        for name, (env, fn) in cases.items():
            set_env(env)
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def set_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["TUNER_HOME"] = str(home)
        for name in ("TUNER_AUTH", "TUNER_TEAMS", "SPACE_ID", "OAUTH_CLIENT_ID"):
            os.environ.pop(name, None)
        make_runs(home, args.runs)
        (home / "teams.txt").write_text("".join(
            f"team{t}: {', '.join(f'user{t}-{k}' for k in range(PER_TEAM))}, auditor\n" for t in range(TEAMS)))
        from tuner.runs import all_runs
        from tuner.ui.runs_tab import refresh_runs

        off = {"TUNER_AUTH": None, "TUNER_TEAMS": None}
        on = {"TUNER_AUTH": "auditor:pw", "TUNER_TEAMS": f"@{home / 'teams.txt'}"}
        everyone, member = Signed("auditor"), Signed("user3-0")
        runs = all_runs()
        got = medians_ms({"without": (off, lambda: refresh_runs(None, Signed(None))),
                          "with": (on, lambda: refresh_runs(None, everyone)),
                          "one_team": (on, lambda: refresh_runs(None, member)),
                          "owners": (off, lambda: [r.owner() for r in runs])}, args.repeats)
        without, with_checks, one_team, owners = got["without"], got["with"], got["one_team"], got["owners"]
        set_env(off)
        listed_without = len(refresh_runs(None, Signed(None))["runs_pick"]["choices"])
        set_env(on)
        listed_with = len(refresh_runs(None, everyone)["runs_pick"]["choices"])
        listed_team = len(refresh_runs(None, member)["runs_pick"]["choices"])
    result = {"runs": args.runs, "repeats": args.repeats, "without_checks_ms": round(without, 1),
              "with_checks_ms": round(with_checks, 1), "added_ms": round(with_checks - without, 1),
              "one_team_ms": round(one_team, 1), "owner_reads_ms": round(owners, 2),
              "listed_without": listed_without, "listed_with": listed_with, "listed_one_team": listed_team}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"refresh_runs on {args.runs} runs, median of {args.repeats}: without checks {without:.1f} ms "
              f"({listed_without} listed); with checks {with_checks:.1f} ms ({listed_with} listed, "
              f"{with_checks - without:+.1f} ms); one team's member {one_team:.1f} ms ({listed_team} listed); "
              f"reading the {args.runs} owner.json files alone (in both): {owners:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
