"""tuner's page: upload conversation logs, fine-tune a small model on them, compare it with the base.

The page is built from tuner/ui/ (one module per tab); this file only assembles and launches it.

    python app.py            # http://127.0.0.1:7860
    TUNER_AUTH=me:secret python app.py   # ask for a user name and password
"""

from __future__ import annotations

import logging
import os
import shutil

from tuner import limits
from tuner.cli import quiet_threads_env
from tuner.paths import uploads_dir
from tuner.ui.data_tab import SAMPLES_DIR
from tuner.ui.page import CSS, I18N, build_demo

quiet_threads_env()  # before the playground imports torch (nothing above does)


def auth_from_env() -> tuple[str, str] | None:
    """TUNER_AUTH="user:password" turns on Gradio's login page (for self-hosting)."""
    value = os.environ.get("TUNER_AUTH", "")
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("TUNER_AUTH must look like user:password")
    return user, password


def main() -> None:
    from tuner import jobs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    jobs.reconcile()  # runs left "running" by a previous process become "interrupted" (resumable)
    jobs.dispatch()  # the queue outlives the app: if the machine is free, the next waiting run starts now
    # sessions of a previous process are gone; their uploads must not outlive them
    shutil.rmtree(uploads_dir(), ignore_errors=True)
    build_demo().queue(max_size=limits.QUEUE_SIZE).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=limits.MAX_UPLOAD_BYTES,
        auth=auth_from_env(),
        allowed_paths=[str(SAMPLES_DIR)],  # the public sample exports; nothing else on disk is served
        run_history=False,  # security: the run history page would keep tokens and transcripts in the browser
        footer_links=["api", "gradio"],
        css=CSS,
        i18n=I18N,  # the strings gradio's own translations lack
    )


if __name__ == "__main__":
    main()
