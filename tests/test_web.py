"""``hallo3 serve``: the page end to end, through ``gradio_client`` and a real browser (Playwright driving
Debian's chromium headless), on the ``tiny-test`` preset.

One server (a subprocess on 127.0.0.1 and a free port) serves the whole module; the last test stops it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import cut_wav

REPO = Path(__file__).resolve().parents[1]
PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-test"
CHROMIUM = os.environ.get("HALLO3_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 # a microphone that plays a file (set per module, see ``browser``)
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
MAX_SPEECH_SECONDS = 3
MAX_UPLOAD_MB = 1


def hallo3(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HALLO3_PRESETS": str(PRESETS), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hallo3_cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# start-up refusals and the auth file (no server, no Gradio needed)


def test_network_host_without_auth_file_is_refused():
    result = hallo3("serve", "--host", "0.0.0.0", "--model", MODEL)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--auth-file" in lines[0] and "0.0.0.0" in lines[0]
    assert result.stdout == ""


def test_without_gradio_the_command_says_how_to_install(tmp_path):
    shim = tmp_path / "shim" / "gradio"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    result = hallo3("serve", "--model", MODEL, env={"PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "hallo3-cli[web]"' in lines[0]


def test_auth_file_format_and_permissions(tmp_path):
    from hallo3_cli.errors import InputError
    from hallo3_cli.web.auth import read_auth_file

    good = tmp_path / "users"
    good.write_text("# team logins\nana:s3cret:with:colons\n\n bo : pw \n")
    for mode in (0o600, 0o400):
        good.chmod(mode)
        assert read_auth_file(good) == [("ana", "s3cret:with:colons"), ("bo", " pw ")]
    # only its owner may have any access: a group that may read (or write) it is refused like everybody
    for mode in (0o644, 0o640, 0o604, 0o620, 0o660, 0o610, 0o601, 0o700 | 0o040):
        good.chmod(mode)
        with pytest.raises(InputError, match=f"group or others have access to it \\(mode {mode:o}\\).*chmod 600"):
            read_auth_file(good)
    good.chmod(0o644)
    link = tmp_path / "link"  # the mode that counts is the file's, not the link's
    link.symlink_to(good)
    with pytest.raises(InputError, match="mode 644"):
        read_auth_file(link)
    fifo = tmp_path / "fifo"  # refused at once, never waited on
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InputError, match="not a regular file"):
        read_auth_file(fifo)
    bad = tmp_path / "bad"
    bad.write_text("ana:pw\njust-a-name\n")
    bad.chmod(0o600)
    with pytest.raises(InputError, match="line 2: expected user:password"):
        read_auth_file(bad)
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    empty.chmod(0o600)
    with pytest.raises(InputError, match="no user:password"):
        read_auth_file(empty)
    assert stat.S_IMODE(good.stat().st_mode) == 0o644  # reading never changes the file


# ---------------------------------------------------------------------------------------------
# the page's rules without a server (hallo3_cli.web.studio)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from hallo3_cli.web.studio import Studio

    root = tmp_path_factory.mktemp("studio")
    return Studio("tiny-random", cache_dir=root / "cache", root=root)


def test_only_files_stored_as_uploads_may_be_named(studio, tmp_path):
    """The rule every endpoint applies to a path a client sends: a file of Gradio's upload folder of this server
    (``<hash>/<name>``), nothing else, and one message for all the rest, whether the path exists or not."""
    from hallo3_cli.errors import InputError
    from hallo3_cli.web.studio import NOT_UPLOADED

    upload = studio.uploads / ("ab" * 32) / "face.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"an upload")
    assert studio.uploaded(str(upload)) == str(upload.resolve())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"a file of the server")
    render = studio.root / "sessions" / "s1" / "renders" / "r.mp4"  # a session's own folder is not an upload
    render.parent.mkdir(parents=True)
    render.write_bytes(b"a render")
    link = studio.uploads / ("cd" * 32) / "link.jpg"  # a link in the upload folder to a file outside it
    link.parent.mkdir()
    link.symlink_to(secret)
    deeper = studio.uploads / "deep" / "er" / "x.jpg"
    deeper.parent.mkdir(parents=True)
    deeper.write_bytes(b"x")
    escape = f"{upload.parent}/../../sessions/s1/renders/r.mp4"
    refused = [str(secret), str(tmp_path / "missing.jpg"), str(upload.parent / "missing.jpg"), str(studio.uploads),
               str(upload.parent), str(link), str(render), escape, str(deeper), "face.jpg", f"{upload.parent.name}/face.jpg",
               "http://127.0.0.1:1/face.jpg", "file:///etc/passwd", "/etc/passwd", "/etc/shadow", "a\0b", "", None, 7,
               ["/etc/passwd"], "/" + "x" * 5000]
    messages = set()
    for path in refused:
        with pytest.raises(InputError) as err:
            studio.uploaded(path)
        messages.add(str(err.value))
    assert messages == {NOT_UPLOADED}, messages
    assert secret.read_bytes() == b"a file of the server" and render.read_bytes() == b"a render"


def test_closing_a_render_never_waits_for_its_worker(studio, media_dir, tmp_path):
    """Gradio closes the generator of a render whose client went away (or that was cancelled) on its event loop:
    closing returns at once even while the worker is in a phase with no cancel check (a model load, a denoising
    step, a VAE decode); the worker then stops at its next check and frees the GPU for the next job."""
    from hallo3_cli.web.studio import Cancelled

    face, speech = media_dir / "face_0003.jpg", cut_wav(media_dir / "speech_0001.wav", tmp_path / "one.wav", 1.0)
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def long_phase(session, face, speech, prompt, settings, memory, vae_tiling, events, cancel):
        with studio.gpu:
            events.put(("status", "loading the models"))
            inside.set()
            release.wait(5)  # cannot be interrupted: only its end checks the cancel flag
            seen["cancelled"] = cancel.is_set()
            if cancel.is_set():
                raise Cancelled

    studio.render_events = long_phase  # the worker's work, as an instance attribute (removed below)
    try:
        session = studio.session("gone")
        updates = studio.render(session, str(face), str(speech), None, 1, 1, 3.5, "none", False)
        next(updates)  # the page has its first update: the render runs
        assert inside.wait(30)
        started = time.monotonic()
        updates.close()  # what Gradio does when the client is gone
        closing = time.monotonic() - started
        assert closing < 1.0, f"closing the render waited {closing:.1f} s for its worker"
        assert studio.gpu.locked() and session.jobs  # the worker is still in its phase
        release.set()
        assert studio.gpu.acquire(timeout=10)  # it stopped and let the next job have the GPU
        studio.gpu.release()
        deadline = time.monotonic() + 10
        while session.jobs:
            assert time.monotonic() < deadline, "the cancelled job never ended"
            time.sleep(0.01)
        assert seen == {"cancelled": True}
    finally:
        release.set()
        del studio.render_events


def test_folders_of_a_killed_server_are_removed_by_the_next_start(tmp_path):
    """``kill -9`` leaves a server's folder (its uploads, its sessions) behind; the next start removes it, and
    nothing that belongs to a running server, to nobody we know, or that is a link."""
    from hallo3_cli.web.studio import claim_server_dir, remove_orphans

    code = ("import sys, time\nfrom hallo3_cli.web.studio import claim_server_dir\n"
            "print(claim_server_dir(sys.argv[1])[0], flush=True)\ntime.sleep(600)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        killed = Path(other.stdout.readline().strip())
        assert killed.name.startswith("hallo3-serve-") and stat.S_IMODE(killed.stat().st_mode) == 0o700
        (killed / "sessions" / "s1").mkdir(parents=True)
        (killed / "sessions" / "s1" / "face.jpg").write_bytes(b"an upload")
        running, owner = claim_server_dir(tmp_path)  # this process: a server that runs
        foreign = tmp_path / "hallo3-serve-nolock"  # not made by a server of this version: left alone
        foreign.mkdir()
        kept = tmp_path / "kept"
        kept.mkdir()
        (tmp_path / "hallo3-serve-link").symlink_to(kept, target_is_directory=True)
        assert remove_orphans(tmp_path) == []  # both servers run
        other.kill()
        other.wait(timeout=10)
        assert killed.is_dir()  # what kill -9 leaves
        assert remove_orphans(tmp_path) == [killed]
        assert not killed.exists() and running.is_dir() and foreign.is_dir() and kept.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hallo3-serve-link", "hallo3-serve-nolock", "kept",
                                                                     running.name])
        shutil.rmtree(running)
        os.close(owner)
    finally:
        other.kill()
        other.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# the server


class Server:
    """``hallo3 serve`` in a subprocess; ``url`` once it listens, ``root`` its private session folder."""

    def __init__(self, tmp: Path, *extra: str, env: dict | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.cache = tmp / "cache"
        self.stderr_path = tmp / "server.err"
        env = {**os.environ, "HALLO3_PRESETS": str(PRESETS), "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hallo3_cli", "serve", "--model", MODEL, "--port", str(self.port),
             "--cache-dir", str(self.cache), "--max-upload-mb", str(MAX_UPLOAD_MB),
             "--max-speech-seconds", str(MAX_SPEECH_SECONDS), *extra],
            stdout=subprocess.PIPE, stderr=self.stderr_path.open("w"), text=True, env=env, cwd=tmp,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        if not lines or not lines[0].strip():
            self.stop()
            pytest.fail(f"the server did not start: {self.stderr_path.read_text()[-2000:]}")
        self.url = lines[0].strip()
        marker = "session files in "
        line = next(l for l in self.stderr_path.read_text().splitlines() if marker in l)
        self.root = Path(line.split(marker, 1)[1].split(" (", 1)[0])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="hallo3 serve needs the web extra: pip install -e '.[web]'")
    pytest.importorskip("gradio_client", reason="the API tests need gradio_client (the test extra)")
    running = Server(tmp_path_factory.mktemp("serve"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def inputs(media_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("web_inputs")
    big = root / "big.wav"
    big.write_bytes(os.urandom(int(MAX_UPLOAD_MB * 1.5 * 1024 * 1024)))
    (root / "speech.txt").write_text("not a recording\n")
    (root / "face.jpg").write_text("not an image\n")
    (root / "noise.wav").write_text("not a recording either\n")
    return {
        "face": media_dir / "face_0003.jpg",  # 480×480
        "speech": cut_wav(media_dir / "speech_0001.wav", root / "two.wav", 2.2),  # 55 frames: 2 clips
        "long": cut_wav(media_dir / "speech_0003.wav", root / "long.wav", MAX_SPEECH_SECONDS + 0.5),
        "big": big, "text_speech": root / "speech.txt", "text_face": root / "face.jpg", "text_wav": root / "noise.wav",
    }


def video_path(value) -> Path:
    """gradio_client returns a Video output as a dict (``{"video": path, ...}``) or a path."""
    return Path(value["video"] if isinstance(value, dict) else value)


def video_frames(speech: Path) -> int:
    from hallo3_cli.audio_io import load_audio

    return math.ceil(len(load_audio(speech)) / 16000 * 25)


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_default_bind_is_loopback_only(server):
    assert server.url == f"http://127.0.0.1:{server.port}/"
    address = non_loopback_address()
    if address is not None:
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect((address, server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass


@pytest.mark.slow
def test_api_render_gives_the_cli_render(server, inputs, tmp_path):
    """The issue's call, verbatim; the page renders the latents of ``hallo3 render`` with the same inputs."""
    from gradio_client import Client, handle_file
    from safetensors.torch import load_file

    from hallo3_cli.video_io import read_video

    cli_out, cli_cache = tmp_path / "cli.mp4", tmp_path / "cli-cache"
    env = {**os.environ, "HALLO3_PRESETS": str(PRESETS), "PYTHONPATH": str(REPO)}
    cli = subprocess.Popen([sys.executable, "-m", "hallo3_cli", "render", str(inputs["face"]), str(inputs["speech"]),
                            "-o", str(cli_out), "--seed", "7", "--model", MODEL, "--cache-dir", str(cli_cache), "-q"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = Client(server.url, verbose=False)
    result = client.predict(face=handle_file(str(inputs["face"])), speech=handle_file(str(inputs["speech"])), seed=7,
                            api_name="/render")
    page_video = video_path(result[0])
    assert page_video.suffix == ".mp4"
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr[-2000:]

    # Same render key (inputs, seed, settings, weights, runtime) and bit-identical clip latents.
    ours = sorted(server.cache.glob("*.parts/clip_*.safetensors"))
    theirs = sorted(cli_cache.glob("*.parts/clip_*.safetensors"))
    assert [p.relative_to(server.cache) for p in ours] == [p.relative_to(cli_cache) for p in theirs]
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert load_file(a)["latents"].equal(load_file(b)["latents"])

    # The videos: same length and sound; the same frames up to rounding (the server decodes the same latents in
    # another process, whose thread pool may sum the VAE's convolutions in another order).
    page_frames, fps, audio_seconds = read_video(page_video)
    cli_frames, _, _ = read_video(cli_out)
    assert page_frames.shape == cli_frames.shape == (video_frames(inputs["speech"]), 64, 64, 3) and fps == 25
    assert abs(audio_seconds - 2.2) <= 1 / 25
    assert np.abs(page_frames.astype(int) - cli_frames.astype(int)).mean() < 1.0
    assert "done: 2 clips" in result[2]
    assert [clip["caption"] for clip in result[1]] == ["clip 1/2", "clip 2/2"]  # the growing preview

    # Past renders reopen in their own session only.
    name = result[3]["value"]
    assert read_video(video_path(client.predict(name, api_name="/reopen")))[0].shape == page_frames.shape
    with pytest.raises(Exception):
        Client(server.url, verbose=False).predict(name, api_name="/reopen")


@pytest.mark.slow
def test_api_cancel_keeps_finished_clips_and_resumes(server, inputs):
    from gradio_client import Client, handle_file

    from hallo3_cli.video_io import read_video

    client = Client(server.url, verbose=False)
    args = dict(face=handle_file(str(inputs["face"])), speech=handle_file(str(inputs["speech"])), seed=8, steps=12,
                api_name="/render")
    job = client.submit(**args)
    deadline = time.monotonic() + 90
    while not any("clip 2/2" in (out[2] or "") for out in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "the render never reached clip 2"
        time.sleep(0.05)
    assert "cancelled" in client.predict(api_name="/cancel")
    with pytest.raises(Exception, match=r"cancelled: 1 of 2 clips finished and kept"):
        job.result(timeout=60)

    result = client.predict(**args)
    assert "1 resumed" in result[2]
    assert read_video(video_path(result[0]))[0].shape[0] == video_frames(inputs["speech"])
    # another seed (7 above, 8 here) on the same portrait and speech reused their stage files
    assert len(list(server.cache.glob("*.audio.safetensors"))) == 1
    assert len(list(server.cache.glob("*.ref.safetensors"))) == 1


@pytest.mark.slow
def test_api_bad_uploads_get_the_cli_message(server, inputs):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    face, speech = handle_file(str(inputs["face"])), handle_file(str(inputs["speech"]))
    cases = [
        (dict(face=face, speech=handle_file(str(inputs["text_speech"]))), "speech.txt: is not a readable audio file"),
        (dict(face=handle_file(str(inputs["text_face"])), speech=speech), "face.jpg: not an image file"),
        (dict(face=face, speech=handle_file(str(inputs["long"]))), f"at most {MAX_SPEECH_SECONDS} s of speech"),
        (dict(face=face, speech=speech, steps=0), "less than minimum value 1"),  # Gradio checks the bounds
    ]
    for kwargs, expected in cases:
        with pytest.raises(Exception) as err:
            client.predict(**kwargs, api_name="/render")
        message = str(err.value)
        assert expected in message
        assert "\n" not in message.strip() and str(server.root) not in message and "Traceback" not in message
    with pytest.raises(Exception):  # over --max-upload-mb: refused at upload
        client.predict(face=face, speech=handle_file(str(inputs["big"])), api_name="/render")
    assert server.proc.poll() is None


@pytest.mark.slow
def test_auth_file_guards_the_page_and_the_api(tmp_path):
    pytest.importorskip("gradio", reason="hallo3 serve needs the web extra: pip install -e '.[web]'")
    import urllib.error
    import urllib.parse
    import urllib.request

    from gradio_client import Client

    def status(url: str, form: dict | None = None) -> int:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with urllib.request.urlopen(url, data=data, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    users = tmp_path / "users"
    users.write_text("ana:correct horse\n")
    users.chmod(0o600)
    guarded = Server(tmp_path, "--auth-file", str(users))
    try:
        assert status(guarded.url + "config") in (401, 403)
        with pytest.raises(Exception):
            Client(guarded.url, verbose=False)
        assert status(guarded.url + "login", {"username": "ana", "password": "wrong"}) >= 400
        client = Client(guarded.url, auth=("ana", "correct horse"), verbose=False)
        assert "/render" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        guarded.stop()


@pytest.mark.slow
def test_server_files_are_not_served_by_path(server):
    """Gradio's file route serves its own copies of uploads and results only: not the stage cache (in the
    server's working folder here), not a session's folder, not any other file of the machine."""
    import urllib.error
    import urllib.parse
    import urllib.request

    stage = next(server.cache.glob("*.ref.safetensors"))  # written by the renders above
    targets = [stage, Path("/etc/passwd"), server.stderr_path, *server.root.glob("sessions/*/renders/*.mp4")]
    for target in targets:
        for route in ("gradio_api/file=", "file="):
            url = server.url + route + urllib.parse.quote(str(target))
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url, timeout=10).close()
            assert err.value.code in (403, 404), (url, err.value.code)


@pytest.mark.slow
def test_api_framing_preview(server, inputs):
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(server.url, verbose=False)
    frame, crop, caption = client.predict(handle_file(str(inputs["face"])), api_name="/framing")
    frame, crop = Image.open(frame), Image.open(crop)
    assert frame.width * 2 == frame.height * 3 and crop.width == crop.height  # 96×64 frame, square video
    assert "480×480 → 96×64 frame" in caption
    with pytest.raises(Exception, match="face.jpg: not an image file"):
        client.predict(handle_file(str(inputs["text_face"])), api_name="/framing")


class RawClient:
    """The queue API over plain HTTP (httpx), as a hostile client uses it: any JSON as an event's data, and a
    connection it may drop at any moment."""

    def __init__(self, server):
        import httpx

        self.httpx, self.base, self.api = httpx, server.url, server.url + "gradio_api"
        self.config = httpx.get(server.url + "config", timeout=30).json()

    def fn(self, api_name: str | None = None, component: str | None = None) -> int:
        """An event's index, by its API name, or (for private events) by the type of its one input."""
        types = {c["id"]: c["type"] for c in self.config["components"]}
        return next(d["id"] for d in self.config["dependencies"]
                    if (api_name is not None and d.get("api_name") == api_name)
                    or (component is not None and [types.get(i) for i in d["inputs"]] == [component]
                        and d.get("api_name") != "framing"))

    def upload(self, path: Path, name: str | None = None) -> dict:
        with open(path, "rb") as file:
            response = self.httpx.post(self.api + "/upload", files=[("files", (name or path.name, file))], timeout=60)
        response.raise_for_status()
        return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}

    def join(self, fn_index: int, data: list) -> str:
        session = uuid.uuid4().hex[:12]
        response = self.httpx.post(self.api + "/queue/join", json={"data": data, "fn_index": fn_index,
                                                                   "session_hash": session}, timeout=30)
        response.raise_for_status()
        return session

    def messages(self, session: str):
        with self.httpx.stream("GET", self.api + "/queue/data", params={"session_hash": session}, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:])

    def call(self, fn_index: int, data: list) -> dict:
        """The final message's ``output`` (``{"data": ...}`` or ``{"error": ...}``)."""
        for message in self.messages(self.join(fn_index, data)):
            if message.get("msg") == "process_completed":
                return message["output"]
        raise AssertionError("the event never completed")


@pytest.mark.slow
def test_api_only_uploads_are_read(server, inputs, tmp_path):
    """A path sent instead of an upload, to any endpoint that takes a file: refused with one message, the same
    whether the file exists or not, before anything opens it."""
    from gradio_client import Client, handle_file

    from hallo3_cli.web.studio import NOT_UPLOADED

    secret = tmp_path / "secret.png"  # an image the server could decode, but nobody uploaded
    shutil.copy(inputs["face"], secret)
    session_render = next(server.root.glob("sessions/*/renders/*.mp4"), None)  # another session's output
    paths = [str(secret), str(tmp_path / "missing.png"), "/etc/passwd", "/etc/shadow", str(server.stderr_path),
             str(server.root / "uploads"), "../../../../etc/passwd", "http://127.0.0.1:1/face.png",
             *([str(session_render)] if session_render else [])]
    raw = RawClient(server)
    face, speech = raw.upload(inputs["face"]), raw.upload(inputs["speech"])
    framing, render, on_speech = raw.fn("framing"), raw.fn("render"), raw.fn(component="audio")
    errors = set()
    for path in paths:
        for named in ({"path": path}, {"path": path, "url": path, "orig_name": "face.png",
                                       "meta": {"_type": "gradio.FileData"}}):
            for fn_index, data in ((framing, [named]), (on_speech, [named]),
                                   (render, [named, speech, None, 1, 1, 3.5, "none", False]),
                                   (render, [face, named, None, 1, 1, 3.5, "none", False]),
                                   (render, [face, speech, named, 1, 1, 3.5, "none", False])):
                output = raw.call(fn_index, data)
                assert "data" not in output, (path, output)
                errors.add(output["error"])
    assert errors == {NOT_UPLOADED}

    client = Client(server.url, verbose=False)  # gradio_client sends a plain dict as it is
    for path in (str(secret), str(tmp_path / "missing.png")):
        for kwargs in (dict(face={"path": path}, speech=handle_file(str(inputs["speech"]))),
                       dict(face=handle_file(str(inputs["face"])), speech={"path": path})):
            with pytest.raises(Exception) as err:
                client.predict(**kwargs, seed=1, steps=1, api_name="/render")
            assert str(err.value).strip() == NOT_UPLOADED
        with pytest.raises(Exception) as err:
            client.predict({"path": path}, api_name="/framing")
        assert str(err.value).strip() == NOT_UPLOADED
    # what was uploaded still works, through both clients
    assert "480×480 → 96×64 frame" in raw.call(framing, [face])["data"][2]
    assert "480×480 → 96×64 frame" in client.predict(handle_file(str(secret)), api_name="/framing")[2]
    assert server.proc.poll() is None


@pytest.mark.slow
def test_api_upload_limit_is_per_request(server, inputs):
    """--max-upload-mb bounds a whole request, not only each of its files; nothing of a refused request is kept."""
    import httpx

    uploads = server.root / "uploads"
    before = set(uploads.rglob("*"))
    part = os.urandom(int(MAX_UPLOAD_MB * 0.6 * (1 << 20)))  # under the limit alone, over it twice
    url = server.url + "gradio_api/upload"
    response = httpx.post(url, files=[("files", ("a.wav", part)), ("files", ("b.wav", part))], timeout=60)
    assert response.status_code == 413 and "--max-upload-mb" in response.text
    many = [("files", (f"{i}.wav", part[: len(part) // 8])) for i in range(16)]
    assert httpx.post(url, files=many, timeout=60).status_code == 413

    def body():  # no declared length (chunked): refused before it is read
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c.wav\"\r\n\r\n"
        for _ in range(4):
            yield part
        yield b"\r\n--b--\r\n"

    response = httpx.post(url, content=body(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 411
    assert set(uploads.rglob("*")) == before  # nothing written
    response = httpx.post(url, files=[("files", ("a.wav", part))], timeout=60)
    assert response.status_code == 200  # one file under the limit is fine
    assert server.proc.poll() is None


@pytest.mark.slow
def test_api_renders_never_collide(server, inputs, media_dir, tmp_path):
    """Two portraits with the same file name, the same speech and seed, in one session: two past renders."""
    from gradio_client import Client, handle_file

    from hallo3_cli.video_io import read_video

    first, second = tmp_path / "a" / "face.jpg", tmp_path / "b" / "face.jpg"
    for source, target in ((inputs["face"], first), (media_dir / "face_0001.jpg", second)):
        target.parent.mkdir()
        shutil.copy(source, target)
    client = Client(server.url, verbose=False)
    names, videos = [], []
    for face in (first, second):
        result = client.predict(face=handle_file(str(face)), speech=handle_file(str(inputs["speech"])), seed=5,
                                api_name="/render")
        names.append(result[3]["value"])
        videos.append(video_path(result[0]))
    assert names[0] != names[1] and names[0].startswith("face-") and names[1].startswith("face-")
    choices = [choice[0] if isinstance(choice, (list, tuple)) else choice for choice in result[3]["choices"]]
    assert set(names) <= set(choices)
    frames = [read_video(video_path(client.predict(name, api_name="/reopen")))[0] for name in names]
    assert frames[0].shape == frames[1].shape and not np.array_equal(frames[0], frames[1])
    assert np.array_equal(frames[0], read_video(videos[0])[0])  # the first render is still the first portrait's


@pytest.mark.slow
def test_dropped_client_blocks_nobody(server, inputs):
    """Client A starts a long render and drops its connection mid-render; client B, measured meanwhile, is served
    at once (pings, a framing preview) and its render runs next: A's render stopped at its next step."""
    import httpx
    from gradio_client import Client, handle_file

    raw = RawClient(server)
    data = [raw.upload(inputs["face"]), raw.upload(inputs["speech"]), "dropped", 11, 1000, 3.5, "none", False]
    session = raw.join(raw.fn("render"), data)
    for message in raw.messages(session):  # until A is mid-render, then its connection closes
        if message.get("msg") == "process_generating" and "step" in json.dumps(message.get("output", {})):
            break
    dropped = time.monotonic()
    pings, stop = [], threading.Event()

    def ping():
        while not stop.is_set():
            started = time.monotonic()
            httpx.get(server.url + "config", timeout=120).raise_for_status()
            pings.append(time.monotonic() - started)
            time.sleep(0.05)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        client = Client(server.url, verbose=False)
        started = time.monotonic()
        client.predict(handle_file(str(inputs["face"])), api_name="/framing")
        framing = time.monotonic() - started
        started = time.monotonic()
        result = client.predict(face=handle_file(str(inputs["face"])), speech=handle_file(str(inputs["speech"])),
                                seed=12, steps=1, api_name="/render")
        rendering = time.monotonic() - started
    finally:
        stop.set()
        pinger.join(timeout=130)
    assert "done: 2 clips" in result[2]
    # A's render (2 clips of 1000 steps) stopped within its first clip: B, which needs the same GPU lock,
    # did not wait for it (else A's clips would exist by now)
    assert not list((server.root / "sessions" / session).glob("clips/*/clip_*.mp4"))
    assert not list((server.root / "sessions" / session).glob("renders/*.mp4"))
    measured = (f"after A dropped: pings max {max(pings, default=0):.2f} s ({len(pings)}), framing {framing:.2f} s, "
                f"render {rendering:.1f} s, all done {time.monotonic() - dropped:.1f} s")
    assert pings and max(pings) < 5 and framing < 30, measured
    print(measured)
    assert server.proc.poll() is None


@pytest.mark.slow
def test_kill_9_leaves_nothing_for_the_next_start(inputs, tmp_path):
    """After ``kill -9`` the server's folder (uploads, sessions) stays; the next ``hallo3 serve`` removes it
    first, even one that then fails."""
    pytest.importorskip("gradio", reason="hallo3 serve needs the web extra: pip install -e '.[web]'")
    from gradio_client import Client, handle_file

    from hallo3_cli.web.studio import SERVER_PREFIX

    temp = tmp_path / "tmp"
    temp.mkdir()
    killed = Server(tmp_path, env={"TMPDIR": str(temp)})
    try:
        Client(killed.url, verbose=False).predict(handle_file(str(inputs["face"])), api_name="/framing")
    finally:
        killed.proc.kill()
        killed.proc.wait(timeout=10)
    assert killed.root.parent == temp and any((killed.root / "uploads").rglob("face_0003.jpg"))
    shim = tmp_path / "shim" / "gradio"  # a start that fails once it looks for Gradio
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    result = hallo3("serve", "--model", MODEL, env={"TMPDIR": str(temp), "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"})
    assert result.returncode == 1 and f"removed {killed.root}, left by a server that is gone" in result.stderr
    assert not killed.root.exists()
    assert not [p for p in temp.iterdir() if p.name.lstrip(".").startswith(SERVER_PREFIX)]


# ---------------------------------------------------------------------------------------------
# a real browser


@pytest.fixture(scope="module")
def browser(server, inputs):
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the test extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set HALLO3_CHROMIUM)")
    with playwright.sync_playwright() as p:
        microphone = f"--use-file-for-fake-audio-capture={inputs['speech']}"
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, microphone])
        yield chromium
        chromium.close()


def open_page(browser, server, inputs, requests: list | None = None, speech: Path | None = None, record: bool = False):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(60_000)
    if requests is not None:
        page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url)
    page.locator("#face input[type=file]").set_input_files(str(inputs["face"]))
    if record:  # the microphone: Record, two seconds, Stop
        page.click("#speech button[aria-label='Record audio']")
        page.locator("#speech button", has_text="Record").first.click()
        page.wait_for_timeout(2000)
        page.locator("#speech button", has_text="Stop").first.click()
        page.wait_for_selector("#speech button[aria-label='Play']")
    else:
        page.locator("#speech input[type=file]").set_input_files(str(speech or inputs["speech"]))
    page.wait_for_selector("#framing img")  # the framing preview, before any GPU work
    return page


def video_duration(page) -> float:
    return page.evaluate("""async () => {
        const v = document.querySelector('#result video');
        if (!(v.duration > 0)) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        return v.duration; }""")


@pytest.mark.slow
def test_browser_render(server, browser, inputs, tmp_path):
    """Upload a portrait, record the speech with the (fake) microphone, render."""
    from hallo3_cli.audio_io import audio_info

    requests: list[str] = []
    page = open_page(browser, server, inputs, requests, record=True)
    caption = page.locator("#framing_caption").inner_text()
    assert "480×480 → 96×64 frame" in caption and "video 64×64" in caption
    assert page.locator("#video_crop img").count() == 1
    page.wait_for_function("document.querySelector('#verdict').innerText.includes('memory is shared')")
    page.click("#render")
    page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
    page.wait_for_selector("#result video")
    # the video lasts as long as the recording the server received (whole frames at 25 fps)
    stem = page.locator("#status").inner_text().split("— face_0003-", 1)[1].split("-seed", 1)[0]
    recordings = [p for p in (server.root / "uploads").rglob(f"{stem}.*") if p.suffix != ".mp4"]
    assert len(recordings) == 1
    seconds = audio_info(recordings[0]).duration
    assert 1.0 < seconds < 10
    assert abs(video_duration(page) - math.ceil(seconds * 25) / 25) <= 0.08
    assert page.locator("#clips video, #clips img").count() >= 1
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("HALLO3_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "serve.png")
    # nothing came from anywhere but the server (no CDN, no analytics)
    foreign = [url for url in requests if not url.startswith((server.url, "blob:", "data:"))]
    assert requests and not foreign, foreign
    page.context.close()


@pytest.mark.slow
def test_browser_bad_uploads_show_the_one_line_message(server, browser, inputs):
    """Files whose type the page accepts but whose content is bad get the CLI's message as soon as they
    are uploaded (a .txt as speech is already refused by the browser side, by type)."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.locator("#face input[type=file]").set_input_files(str(inputs["text_face"]))
    page.locator("#speech input[type=file]").set_input_files(str(inputs["text_wav"]))
    for expected in ("face.jpg: not an image file", "noise.wav: is not a readable audio file"):
        toast = page.locator(".toast-body", has_text=expected).first
        toast.wait_for()
        assert "Traceback" not in toast.inner_text() and str(server.root) not in toast.inner_text()
    context.close()


@pytest.mark.slow
def test_browser_two_sessions_queue(server, browser, inputs, tmp_path):
    speech = tmp_path / "queue.wav"  # uploaded by these two tabs only
    shutil.copy(inputs["speech"], speech)
    first = open_page(browser, server, inputs, speech=speech)
    second = open_page(browser, server, inputs, speech=speech)
    sessions_before = len(list((server.root / "sessions").iterdir()))
    first.locator("#steps input").fill("10")
    first.click("#render")
    first.wait_for_function("document.querySelector('#status').innerText.includes('step')")
    second.click("#render")
    second.wait_for_function("document.querySelector('#status').innerText.includes('queue')", timeout=20_000)
    for page in (first, second):
        page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
        assert abs(video_duration(page) - 2.2) <= 0.08
    # each tab has its own renders; closing a tab deletes its folder
    assert first.locator("#renders input").input_value() != second.locator("#renders input").input_value()
    assert list((server.root / "uploads").rglob("queue.wav"))
    first.context.close()
    second.context.close()
    deadline = time.monotonic() + 20
    while len(list((server.root / "sessions").iterdir())) > sessions_before - 2:
        assert time.monotonic() < deadline, "closed tabs kept their session folders"
        time.sleep(0.2)
    while list((server.root / "uploads").rglob("queue.wav")):
        assert time.monotonic() < deadline, "closed tabs kept their uploads"
        time.sleep(0.2)


@pytest.mark.slow
def test_server_stop_removes_its_files(server):
    assert server.root.is_dir()
    server.stop()
    assert not server.root.exists()
