"""tuner's page: upload conversation logs, fine-tune a small model on them, compare it with the base.

The page is built from tuner/ui/ (one module per tab); this file only assembles and launches it.

    python app.py            # http://127.0.0.1:7860
    TUNER_AUTH=alice:pw1,bob:pw2 python app.py   # ask for a user name and password (tuner.auth)
    TUNER_AUTH=@passwords.txt TUNER_TEAMS=@teams.txt python app.py   # hashed passwords, teams
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from tuner import auth, limits
from tuner.cli import quiet_threads_env
from tuner.errors import TunerError
from tuner.paths import uploads_dir
from tuner.ui.data_tab import SAMPLES_DIR
from tuner.ui.page import CSS, I18N, build_demo

quiet_threads_env()  # before the playground imports torch (nothing above does)


def auth_from_env() -> Callable[[str, str], bool] | None:
    """TUNER_AUTH turns on Gradio's login page (self-hosting): pairs `user:password,...` or `@FILE` of hashed
    lines (tuner.auth). A file with a bad line stops the start with the file, line and fix named."""
    try:
        return auth.login_check()
    except TunerError as exc:
        raise SystemExit(f"error: {exc}") from None


def main() -> None:
    from tuner import jobs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    login = auth_from_env()  # before anything else: a bad password file is said at once
    jobs.reconcile()  # runs left "running" by a previous process become "interrupted" (resumable)
    jobs.dispatch()  # the queue outlives the app: if the machine is free, the next waiting run starts now
    # sessions of a previous process are gone; their uploads must not outlive them
    shutil.rmtree(uploads_dir(), ignore_errors=True)
    build_demo().queue(max_size=limits.QUEUE_SIZE).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=limits.MAX_UPLOAD_BYTES,
        auth=login,
        allowed_paths=[str(SAMPLES_DIR)],  # the public sample exports; nothing else on disk is served
        run_history=False,  # security: the run history page would keep tokens and transcripts in the browser
        footer_links=["api", "gradio"],
        css=CSS,
        i18n=I18N,  # the strings gradio's own translations lack
    )


if __name__ == "__main__":
    main()
