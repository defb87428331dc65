"""The Gradio page of ``hallo3 serve`` and the server that runs it.

No ``from __future__ import annotations``: Gradio reads the handlers' annotations (gr.Request) at runtime.
"""

import logging
import math
import os
import shutil
import time
from pathlib import Path

from hallo3_cli import options
from hallo3_cli.errors import Hallo3Error, UsageError
from hallo3_cli.runtime import OFFLOAD_CHOICES
from hallo3_cli.web.auth import DEFAULT_HOST, LOCAL_HOSTS, check_host, read_auth_file
from hallo3_cli.web.studio import (DEFAULT_MAX_SPEECH_SECONDS, Studio, check_speech, claim_server_dir, memory_verdict,
                                   one_line, remove_orphans)

log = logging.getLogger("hallo3")

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 50.0
INSTALL_HINT = 'the web page needs Gradio, an optional extra: pip install "hallo3-cli[web]"'


def require_gradio():
    """The gradio module, or a one-line error saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, at import or at page load
    try:
        import gradio
    except ImportError:
        raise Hallo3Error(INSTALL_HINT) from None
    return gradio


CSS = "#status {min-height: 2.5em} footer {display: none !important}"
#: Bytes a request may carry beyond --max-upload-mb: the multipart headers of one file, or a JSON event.
REQUEST_OVERHEAD = 64 << 10


class RequestLimit:
    """ASGI middleware: a request whose body is larger than ``limit`` bytes is answered 413 before any byte of it
    is read (Gradio's own limit is per file, and one upload request may carry a thousand files). The length must
    be declared (``Content-Length``, as browsers and gradio_client send it); a body without one gets 411."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" in headers:
            return await self._refuse(send, 411, "a request body needs a Content-Length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send, 413, f"the request is larger than this server's limit of {self.limit} bytes "
                                                 "(hallo3 serve --max-upload-mb)")
        received = 0

        async def counted():  # the server stops a body at its declared length; this holds if that ever changes
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return {"type": "http.disconnect"} if received > self.limit else message

        return await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(send, status: int, text: str):
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def build_page(studio: Studio):
    """The Gradio Blocks of the page (``/render`` is its API)."""
    import gradio as gr

    preset = studio.preset

    def error(err: BaseException, *paths) -> Exception:
        return gr.Error(one_line(err, {str(p): Path(str(p)).name for p in paths if p}), print_exception=False)

    def check_files(inputs: list):
        """Every file a client names, anywhere in an event's inputs (any dict with a ``path``), must be one this
        server stored for the page (:meth:`Studio.uploaded`); else the event stops with one message. (A loop,
        not a recursion: the JSON may be nested as deep as its parser allows.)"""
        pending = [inputs]
        while pending:
            value = pending.pop()
            if isinstance(value, dict):
                if "path" in value:
                    try:
                        studio.uploaded(value["path"])
                    except Hallo3Error as err:
                        raise error(err) from None
                pending.extend(value.values())
            elif isinstance(value, (list, tuple)):
                pending.extend(value)

    def uploaded_file(payload):
        """The preprocess of the portrait and the speech: the uploaded file's path, untouched (gr.Image would open
        it with PIL, gr.Audio might convert it), so the render decodes it as the CLI does and a bad file gets the
        CLI's message. (An instance attribute, not a subclass: Gradio writes a .pyi stub next to the module of
        every component subclass.)"""
        if payload is None:
            return None
        try:
            return studio.uploaded(payload.path)  # the check again, where the path is handed over
        except Hallo3Error as err:
            raise error(err) from None

    def on_preview(face, request: gr.Request):
        if face is not None:
            studio.session(request.session_hash).uploads.add(str(face))
        try:
            return studio.preview(face)
        except Hallo3Error as err:
            raise error(err, face) from None

    def on_speech(speech):
        if speech is None:
            return ""
        try:
            seconds = check_speech(speech, studio.max_speech_seconds)
        except Hallo3Error as err:
            raise error(err, speech) from None
        return f"speech: {seconds:.1f} s"

    def on_memory(memory, vae_tiling):
        return memory_verdict(preset, memory, bool(vae_tiling))

    def render(face, speech, prompt=preset.default_prompt, seed=42, steps=preset.steps, cfg=preset.cfg,
               memory="auto", vae_tiling=False, request: gr.Request = None, progress=gr.Progress()):
        session = studio.session(request.session_hash if request is not None else None)
        session.uploads.update(str(path) for path in (face, speech) if path is not None)
        try:
            for video, clips, status, name in studio.render(session, face, speech, prompt, seed, steps, cfg, memory,
                                                             vae_tiling, progress):
                renders = gr.skip() if name is None else gr.update(choices=list(session.renders), value=name)
                yield (gr.skip() if video is None else video), clips, status, renders
        except Exception as err:  # noqa: BLE001 - the page shows one line, the server log the traceback
            if not isinstance(err, Hallo3Error):
                log.error("render failed: %s", one_line(err, {}))
            raise error(err, face, speech) from None

    def cancel(request: gr.Request):
        return studio.cancel(studio.session(request.session_hash))

    def reopen(name, request: gr.Request):
        try:
            return studio.reopen(studio.session(request.session_hash), name)
        except Hallo3Error as err:
            raise error(err) from None

    def unload(request: gr.Request):
        studio.end_session(request.session_hash)

    with gr.Blocks(title="Hallo3", analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as page:
        gr.Markdown(f"## Hallo3 — talking portrait\nModel **{preset.name}**"
                    + (" (random weights: the output is noise)" if preset.is_random else "")
                    + f" · {preset.width}×{preset.height}, {preset.fps} fps · one render at a time, others queue")
        with gr.Row():
            with gr.Column():
                face = gr.Image(label="Portrait", type="filepath", sources=["upload"],
                                elem_id="face", height=260)
                speech = gr.Audio(label="Speech (upload or record)", type="filepath", sources=["upload", "microphone"],
                                  elem_id="speech")
                face.preprocess = speech.preprocess = uploaded_file
                prompt = gr.Textbox(label="Prompt", value=preset.default_prompt, lines=2, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=42, precision=0, elem_id="seed")
                    steps = gr.Number(label="Steps", value=preset.steps, precision=0, minimum=options.STEPS[0],
                                      maximum=options.STEPS[1], elem_id="steps")
                    cfg = gr.Number(label="CFG scale", value=preset.cfg, minimum=options.GUIDANCE[0],
                                    maximum=options.GUIDANCE[1], elem_id="cfg")
                with gr.Row():
                    memory = gr.Dropdown(list(OFFLOAD_CHOICES), value="auto", label="Memory mode", elem_id="memory")
                    vae_tiling = gr.Checkbox(label="VAE tiling", value=False, elem_id="vae_tiling")
                verdict = gr.Markdown(elem_id="verdict")
                with gr.Row():
                    go = gr.Button("Render", variant="primary", elem_id="render")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                with gr.Row():
                    framed = gr.Image(label="Model frame (face box, mask, crop)", type="pil", format="png",
                                      interactive=False, elem_id="framing", height=200)
                    cropped = gr.Image(label="Video crop", type="pil", format="png", interactive=False,
                                       elem_id="video_crop", height=200)
                framing_caption = gr.Markdown(elem_id="framing_caption")
                status = gr.Markdown(label="Status", elem_id="status")
                clips = gr.Gallery(label="Clips so far", columns=4, height=170, elem_id="clips", interactive=False)
                result = gr.Video(label="Result", elem_id="result", interactive=False, height=360)
                renders = gr.Dropdown([], label="Past renders (this session)", elem_id="renders", interactive=True)

        face.change(on_preview, face, [framed, cropped, framing_caption], concurrency_limit=2,
                    concurrency_id="preview", api_name="framing")
        speech.change(on_speech, speech, status, concurrency_limit=2, concurrency_id="preview",
                      api_visibility="private")
        memory.change(on_memory, [memory, vae_tiling], verdict, api_visibility="private", queue=False)
        vae_tiling.change(on_memory, [memory, vae_tiling], verdict, api_visibility="private", queue=False)
        page.load(on_memory, [memory, vae_tiling], verdict, api_visibility="private")
        rendering = go.click(render, [face, speech, prompt, seed, steps, cfg, memory, vae_tiling], [result, clips, status, renders],
                 concurrency_limit=1, concurrency_id="gpu", api_name="render", show_progress_on=[status])
        # Cancel stops a running render within one step (its flag) and takes a waiting one out of the queue.
        stop.click(cancel, None, status, queue=False, api_name="cancel")
        stop.click(None, None, None, cancels=[rendering], api_visibility="private")
        renders.select(reopen, renders, result, api_name="reopen")
        page.unload(unload)

    # Where the paths a client sends are first seen: Gradio checks an event's inputs here, before it copies,
    # downloads or opens any file they name (its own check then covers only FileData marked as such, and
    # answers in its own words). Every endpoint, public or not, goes through it.
    validate_inputs = page.validate_inputs

    def validate_files(block_fn, inputs):
        validate_inputs(block_fn, inputs)
        check_files(list(inputs))

    page.validate_inputs = validate_files
    return page


def serve(model: str = "hallo3", *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          auth_file: str | os.PathLike | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          max_speech_seconds: float = DEFAULT_MAX_SPEECH_SECONDS, cache_dir: str | os.PathLike = ".hallo3-cache") -> None:
    """Run the page until interrupted; prints its URL on stdout once it listens."""
    check_host(host, auth_file)
    if not (max_upload_mb > 0 and math.isfinite(max_upload_mb)):
        raise UsageError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    if not (max_speech_seconds > 0 and math.isfinite(max_speech_seconds)):
        raise UsageError(f"--max-speech-seconds must be a positive number, got {max_speech_seconds}")
    users = read_auth_file(auth_file) if auth_file is not None else None
    for folder in remove_orphans():
        log.info("removed %s, left by a server that is gone", folder)
    root, owner = claim_server_dir()  # 0700: this user's only; locked while this process lives
    os.environ["GRADIO_TEMP_DIR"] = str(root / Studio.UPLOADS)  # Gradio's own copies of the uploads
    try:
        gr = require_gradio()
        from starlette.middleware import Middleware

        studio = Studio(model, cache_dir=cache_dir, root=root, max_speech_seconds=max_speech_seconds)
        page = build_page(studio)
        page.queue(default_concurrency_limit=1)
        log.info("session files in %s (removed when the server stops)", root)
        max_bytes = int(max_upload_mb * (1 << 20))
        try:
            page.launch(server_name=host, server_port=port, auth=users, max_file_size=max_bytes,
                        prevent_thread_lock=True, quiet=True, show_error=True, ssr_mode=False, pwa=False,
                        mcp_server=False, enable_monitoring=False, css=CSS, theme=gr.themes.Default(),
                        app_kwargs={"middleware": [Middleware(RequestLimit, limit=max_bytes + REQUEST_OVERHEAD)]})
        except OSError:
            raise Hallo3Error(f"cannot listen on {host}:{port}: the port is taken or the address is not this "
                              "machine's (choose another with --port or --host)") from None
        print(page.local_url if host in LOCAL_HOSTS else f"http://{host}:{port}/", flush=True)
        try:
            while page.is_running:
                time.sleep(0.2)
        finally:
            page.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.close(owner)
