"""``hallo3 serve``: the whole render as a Gradio web page (the optional extra ``pip install "hallo3-cli[web]"``).

The page drives :class:`hallo3_cli.jobs.VideoRenderer`, exactly what ``hallo3 render`` runs, on the same
stage cache: the same inputs, seed and settings give the same latents as the CLI, finished clips are kept
(a cancelled render resumes), and another seed on the same portrait and speech reuses their stage files.

Security model: the server binds 127.0.0.1 unless told otherwise, and refuses any other address without
an auth file (lines ``user:password``, in a file only its owner may access). The page opens only files the
server stored as uploads (or its own outputs): any other path a client sends, to any endpoint, is refused
with one message before anything opens it; uploads are limited in size per request and speech duration;
each browser session has its own folder in the server's private temporary directory (removed when the
session ends and when the server stops; after a crash, by the next start) for its renders and clip
previews; bad inputs show the CLI's one-line message. Shared between sessions: the stage cache
(``--cache-dir``; stage files and finished clips, keyed by content, never shown or served) and the one GPU:
one render at a time, the others wait in Gradio's queue with their position shown; a render whose client
went away stops at its next step without holding up anyone.

- :mod:`.auth`: who may see the page (the address served, the auth file);
- :mod:`.studio`: the page's work without Gradio: sessions, the models kept loaded, the render worker;
- :mod:`.page`: the Gradio page and the server.
"""

from hallo3_cli.web.page import serve

__all__ = ["serve"]
