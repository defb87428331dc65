"""Building a ``Hallo3Pipeline`` for a model preset (whisper's ``load_model``): each network loaded (the release's
weights from ``<model home>/<preset>/<component>/``) or built (random presets: seeded weights in memory), then
placed where a :class:`~hallo3_cli.runtime.Runtime` says.

    from hallo3_cli import load_pipeline
    pipe = load_pipeline("tiny-random")                       # every component, ready to call
    loader = PipelineLoader(get_preset("hallo3"), Runtime())  # the jobs' frugal form: networks load when
    loader.need("audio_encoder", "feature_extractor").encode_audio("speech.wav")   # a stage needs them
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hallo3_cli import networks
from hallo3_cli.components import COMPONENTS, FACE_ANALYZER, FACE_FOLDER, component
from hallo3_cli.errors import ModelError, reason
from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline
from hallo3_cli.plan import choose_memory_mode
from hallo3_cli.presets import Preset, get_preset, preset_names
from hallo3_cli.runtime import Runtime
from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

log = logging.getLogger("hallo3")

#: Every component of a pipeline, face models included, in the order a render first needs them.
ALL_COMPONENTS = ("feature_extractor", "audio_encoder", FACE_ANALYZER, "vae", "tokenizer", "text_encoder",
                  "reference_net", "transformer")


# ---------------------------------------------------------------------------------------------
# one network


def load_network(preset: Preset, network: str, device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One network of a preset (:data:`~hallo3_cli.components.NETWORKS`) on ``device`` in ``dtype`` (wav2vec2:
    always float32), in evaluation mode without gradients: built with seeded weights for a random preset,
    else loaded from its installed folder."""
    if network == "wav2vec":
        dtype = torch.float32  # small, and the features are stored in float32
    if preset.is_random:
        model = networks.random_network(preset, network)
    else:
        model = _from_folder(preset, network, device, dtype)
    if network == "wav2vec" and model.config.do_stable_layer_norm:
        raise ModelError("pre-norm (stable layer norm) wav2vec2 variants are not supported; Hallo3 uses wav2vec2-base")
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    return model.to(device=device).eval().requires_grad_(False)


def _component_class(preset: Preset, name: str):
    """The class of a component: the one a model folder's ``model_index.json`` names, else the release's."""
    import importlib
    import json

    entry = component(name)
    library, class_name = entry.library, entry.class_name
    if preset.is_folder:
        recorded = json.loads((preset.home / "model_index.json").read_text()).get(name)
        if isinstance(recorded, list) and len(recorded) == 2 and all(isinstance(v, str) for v in recorded):
            library, class_name = recorded
    module = importlib.import_module(library)
    if not hasattr(module, class_name):  # diffusers records some classes by their package (e.g. "transformers")
        raise ModelError(f"model_index.json names {library}.{class_name}, which is not importable here", preset.home)
    return getattr(module, class_name)


def _from_folder(preset: Preset, network: str, device, dtype: torch.dtype) -> torch.nn.Module:
    entry = next(c for c in COMPONENTS if c.network == network)
    folder = preset.require(entry.folder)
    cls = _component_class(preset, entry.name)
    placed = {"device_map": str(device)} if str(device).startswith("cuda") else {}  # no full copy in host RAM first
    if network != "wav2vec":
        return cls.from_pretrained(folder, torch_dtype=dtype, **placed)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the 960h checkpoint is a CTC model: its lm_head is unused here
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load the wav2vec weights ({reason(err)}); run: hallo3 download", folder) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(preset: Preset):
    """The T5 tokenizer; random presets have a hashing one (no vocabulary file)."""
    if preset.is_random:
        return networks.random_tokenizer(preset)
    if preset.is_folder:
        return _component_class(preset, "tokenizer").from_pretrained(preset.require("tokenizer"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preset.require("tokenizer"))


def load_feature_extractor(preset: Preset):
    """wav2vec2's ``Wav2Vec2FeatureExtractor`` (sampling rate, normalisation); must be 16 kHz."""
    from transformers import Wav2Vec2FeatureExtractor

    from hallo3_cli.audio_io import SAMPLE_RATE

    if preset.is_random:
        return networks.default_feature_extractor()
    folder = preset.home / "feature_extractor" if preset.is_folder else preset.require("wav2vec")
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"unreadable preprocessor config ({reason(err)})", folder) from None
    if extractor.sampling_rate != SAMPLE_RATE:
        raise ModelError(f"the wav2vec model expects {extractor.sampling_rate} Hz audio; hallo3 uses {SAMPLE_RATE} Hz", folder)
    return extractor


def load_face_analyzer(preset: Preset, device: str = "cpu"):
    """The preset's face models (SCRFD + ArcFace on onnxruntime, run on ``device`` where onnxruntime can). Random
    presets have none (None: no face detection, a zero face embedding, the whole image as the face region)
    unless their table names a ``face_models`` folder (tests build small ONNX models there). Missing release
    files raise ModelError."""
    from hallo3_cli.face import FaceAnalyzer, providers_for_device

    if preset.is_random:
        folder = preset.table.get("face_models")
        return FaceAnalyzer.from_dir(folder, providers_for_device(device)) if folder else None
    if preset.is_folder and not preset.is_installed(FACE_FOLDER):  # a model folder without face models
        return None
    return FaceAnalyzer.from_dir(preset.require(FACE_FOLDER), providers_for_device(device))


# ---------------------------------------------------------------------------------------------
# LoRA adapters


LORA_FILE = "pytorch_lora_weights.safetensors"  # the main DiT's adapters, diffusers' format (keys transformer.*)
REFERENCE_LORA_FILE = "reference_lora_weights.safetensors"  # the reference network's, if trained (reference_net.*)
ADAPTER = "hallo3-lora"


@dataclass(frozen=True)
class LoraWeights:
    """LoRA adapters to apply at ``scale``: the main DiT's (``pytorch_lora_weights.safetensors``, diffusers' format,
    what ``pipe.load_lora_weights`` reads) and, when a run also adapted the reference network, its own file beside
    it (``reference_lora_weights.safetensors``, keys ``reference_net.*``)."""

    path: Path
    scale: float = 1.0
    reference_path: Path | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> LoraWeights:
        """``PATH[:SCALE]``; PATH is the adapters' file or the folder holding them (``hallo3 train --lora``'s
        output). Checked here: the files exist and are LoRA weights of our networks, the scale is in range."""
        from hallo3_cli import options, store
        from hallo3_cli.errors import InputError, UsageError
        from hallo3_cli.fsutil import require_file

        text, scale = str(spec), 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and Path(head).expanduser().exists():
            try:
                scale = float(tail)
            except ValueError:
                raise UsageError(f"--lora {text}: the scale after ':' must be a number") from None
            text = head
        low, high = options.LORA_SCALE
        if not (math.isfinite(scale) and low <= scale <= high):
            raise UsageError(f"--lora {spec}: the scale must be from {low:g} to {high:g}, got {scale:g}")
        path = Path(text).expanduser()
        folder = path if path.is_dir() else None
        if folder is not None:
            path = folder / LORA_FILE
        path = require_file(path)
        reference = folder / REFERENCE_LORA_FILE if folder is not None and (folder / REFERENCE_LORA_FILE).is_file() else None
        for file, prefix in ((path, "transformer."), (reference, "reference_net.")):
            if file is None:
                continue
            try:
                names = [k for k in store.read_safetensors_header(file) if k != "__metadata__"]
            except (OSError, ValueError) as err:
                raise InputError(f"not a LoRA weights file ({err})", file) from None
            if not names or not all(k.startswith(prefix) and "lora" in k for k in names):
                raise InputError(f"not LoRA weights of the {prefix[:-1]} (expected lora keys under '{prefix}')", file)
        return cls(path, scale, reference)

    def identity(self) -> dict:
        """What a render that uses these adapters depends on (for stage files and resume keys)."""
        from hallo3_cli.fsutil import sha256_file

        files = [self.path] + ([self.reference_path] if self.reference_path is not None else [])
        return {"lora": [sha256_file(f)[:16] for f in files], "lora_scale": self.scale}

    def reference_identity(self) -> dict | None:
        """What the reference network's output depends on (None: the adapters leave it alone)."""
        if self.reference_path is None:
            return None
        from hallo3_cli.fsutil import sha256_file

        return {"reference_lora": sha256_file(self.reference_path)[:16], "lora_scale": self.scale}

    def apply(self, model: torch.nn.Module, network: str) -> None:
        """Load this run's adapters into ``model`` (the main DiT or the reference network) through diffusers'
        adapter API, at the scale."""
        path, prefix = (self.path, "transformer") if network == "transformer" else (self.reference_path, "reference_net")
        if path is None:
            return
        model.load_lora_adapter(str(path), prefix=prefix, adapter_name=ADAPTER)
        model.set_adapters([ADAPTER], weights=[self.scale])


# ---------------------------------------------------------------------------------------------
# placement


class _OneAtATime:
    """``model`` offloading (accelerate's ``CpuOffload``): before a network runs, every other network of the
    placement goes back to the host, so one network at a time is on the device. (The hook also fires for
    diffusers' ``vae.encode``/``decode``, which call it through ``apply_forward_hook``.)"""

    @staticmethod
    def hook(placement: Placement):
        from accelerate.hooks import CpuOffload

        class OneAtATime(CpuOffload):
            def pre_forward(self, module, *args, **kwargs):
                placement.offload_all(but=module)
                return super().pre_forward(module, *args, **kwargs)

        return OneAtATime(execution_device=placement.device)


class Placement:
    """Puts freshly loaded networks where a resolved :class:`Runtime` says, and frees them."""

    def __init__(self, runtime: Runtime):
        if "auto" in (runtime.device, runtime.dtype, runtime.offload):
            raise ValueError("Placement needs a resolved Runtime (see resolve_runtime)")
        self.runtime = runtime
        self.device = runtime.device
        self.dtype = runtime.torch_dtype
        self._hooks: dict[int, Any] = {}

    @property
    def load_device(self) -> str:
        """Where weights are loaded: straight to the device unless an offload mode keeps them on the host
        or they are first cast to a smaller storage dtype (cast on the host, then moved)."""
        return self.device if self.runtime.offload == "none" and self.runtime.storage_dtype is None else "cpu"

    def place(self, model: torch.nn.Module, network: str) -> torch.nn.Module:
        """Apply weight storage and offloading to a freshly loaded network. Block networks
        (:data:`~hallo3_cli.networks.BLOCK_NETWORKS`) are cast layer by layer and offloaded by group; the VAE and wav2vec2 stay
        whole on the device in group mode."""
        runtime = self.runtime
        blocks = network in networks.BLOCK_NETWORKS
        storage = runtime.storage_dtype
        if blocks and storage is not None and hasattr(model, "enable_layerwise_casting"):
            model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=self.dtype)
        if runtime.offload == "none" or (runtime.offload == "group" and not blocks):
            return model.to(self.device)
        if runtime.offload == "model":
            from accelerate.hooks import UserCpuOffloadHook, add_hook_to_module

            hook = _OneAtATime.hook(self)
            add_hook_to_module(model, hook, append=True)
            self._hooks[id(model)] = UserCpuOffloadHook(model, hook)
            return model
        if runtime.offload == "group":
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(
                model, onload_device=torch.device(self.device), offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1, use_stream=self.device.startswith("cuda"),
                block_modules=list(networks.BLOCK_NETWORKS[network]) or None, low_cpu_mem_usage=True,  # no second (pinned) host copy
            )
            return model
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device=self.device)

    def offload_all(self, but: torch.nn.Module | None = None) -> None:
        """``model`` mode: every network that sits on the device goes back to the host (except ``but``)."""
        for key, hook in self._hooks.items():
            if hook.model is not but and next(hook.model.parameters()).device != torch.device("cpu"):
                hook.offload()

    def forget(self, model: torch.nn.Module | None) -> None:
        """Drop a network for good (T5, reference DiT) and return its device memory."""
        if model is not None:
            hook = self._hooks.pop(id(model), None)
            if hook is not None:
                hook.offload()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_runtime(runtime: Runtime | None, preset: Preset) -> Runtime:
    """``runtime`` with every ``auto`` made concrete: device and dtype, and on CUDA the fastest memory mode whose
    plan fits the free device memory (:func:`hallo3_cli.plan.choose_memory_mode`)."""
    runtime = (runtime or Runtime()).resolved()
    return choose_memory_mode(runtime, preset) if runtime.offload == "auto" else runtime


# ---------------------------------------------------------------------------------------------
# the pipeline


class PipelineLoader:
    """A ``Hallo3Pipeline`` of a preset whose components load when a stage asks for them (:meth:`need`) and can
    be freed as soon as their outputs exist (:meth:`release`: T5 and the reference DiT are needed once per
    portrait). ``parallel`` (a :class:`~hallo3_cli.parallel.ParallelConfig`; the runtime's device is its
    device): the main DiT's calls are split over the process group once it is placed (``--parallel video``).
    ``pipe``: an existing pipeline of the preset (e.g. a trainer's, built from the networks it trains): its
    components are used as they are and never released; only those it lacks are loaded (and freed) here."""

    def __init__(self, preset: Preset, runtime: Runtime | None = None, *, parallel=None,
                 lora: LoraWeights | None = None, pipe: Hallo3Pipeline | None = None):
        self.preset = preset
        self.lora = lora
        self.runtime = resolve_runtime(runtime, preset)
        if parallel is not None and str(parallel.device) != self.runtime.device:
            raise ValueError(f"the runtime's device {self.runtime.device} is not the parallel config's {parallel.device}")
        if self.runtime.reason and self.runtime.device.startswith("cuda"):
            log.info("memory mode: %s", self.runtime.reason)
        self.placement = Placement(self.runtime)
        self.parallel = parallel
        self.parallel_state = None
        self._borrowed: set[str] = set()  # the components of a given ``pipe``: the caller's, never released
        if pipe is None:
            pipe = Hallo3Pipeline(transformer=None, vae=None, scheduler=Hallo3DPMSolverSDEScheduler(),
                                  **preset.pipeline_config())
        else:
            self._borrowed = {name for name in pipe.components if getattr(pipe, name, None) is not None}
        self.pipe = pipe
        self.pipe.parallel = parallel
        self.pipe.set_progress_bar_config(disable=True)  # the jobs show their own clip/step progress
        self._face_loaded = pipe.face_analyzer is not None

    def need(self, *names: str) -> Hallo3Pipeline:
        """The pipeline, with the components ``names`` loaded (those already there are kept)."""
        for name in names:
            if name == FACE_ANALYZER:
                if not self._face_loaded:
                    self.pipe.face_analyzer = load_face_analyzer(self.preset, self.placement.device)
                    self._face_loaded = True
            elif getattr(self.pipe, name, None) is None:
                self.pipe.register_modules(**{name: self.load(name)})
        return self.pipe

    def release(self, *names: str) -> None:
        """Free components for good (they load again if a later stage needs them)."""
        for name in names:
            module = getattr(self.pipe, name, None)
            if module is None or name in self._borrowed:
                continue
            self.pipe.register_modules(**{name: None})
            if isinstance(module, torch.nn.Module):
                self.placement.forget(module)
            del module

    def load(self, name: str):
        """One component of the preset, placed."""
        preset, placement, runtime = self.preset, self.placement, self.runtime
        if name == "scheduler":
            return Hallo3DPMSolverSDEScheduler()
        if name == "tokenizer":
            return load_tokenizer(preset)
        if name == "feature_extractor":
            return load_feature_extractor(preset)
        if name == "audio_encoder":  # small: straight onto the device, whatever the mode
            return load_network(preset, "wav2vec", placement.device)
        entry = component(name)
        network = entry.network
        log.info("loading the %s", entry.label or name)  # (the release's DiT takes minutes from a slow disk)
        model = load_network(preset, network, placement.load_device, placement.dtype)
        if network == "vae" and runtime.vae_tiling:
            model.enable_tiling()
        if self.lora is not None and network in ("transformer", "reference"):
            self.lora.apply(model, network)  # before placement: offloading hooks see the adapted layers
        model = placement.place(model, network)
        if network == "transformer":
            if runtime.cache is not None:
                from diffusers.hooks import FirstBlockCacheConfig

                model.enable_cache(FirstBlockCacheConfig(threshold=runtime.cache))
            if self.parallel is not None:
                from hallo3_cli.parallel import parallelize_transformer

                self.parallel_state = parallelize_transformer(model, self.parallel)
            if runtime.compile:
                model.compile_repeated_blocks(fullgraph=False, dynamic=False)
        return model


def load_pipeline(model: str | Preset = "hallo3", *, device: str | torch.device = "auto",
                  torch_dtype: torch.dtype | str | None = None, runtime: Runtime | None = None) -> Hallo3Pipeline:
    """A ``Hallo3Pipeline`` of a model preset (``models.toml``) with every component loaded and placed.

    ``device``/``torch_dtype`` (``auto``: CUDA, then MPS, else the CPU; bfloat16 on CUDA, float32 elsewhere), or
    a whole :class:`~hallo3_cli.runtime.Runtime` (memory mode, fp8 weights, VAE tiling, compile, cache).
    The release's weights must be installed (``hallo3 download``); random presets build theirs in memory.
    """
    from hallo3_cli.errors import UsageError

    if isinstance(model, str) and model not in preset_names():
        raise UsageError(f"{model!r} is neither a model preset ({', '.join(preset_names())}) "
                         "nor a folder with a model_index.json")
    preset = get_preset(model) if isinstance(model, str) else model
    if runtime is None:
        dtype = "auto" if torch_dtype is None else str(torch_dtype).removeprefix("torch.")
        runtime = Runtime(device=str(device), dtype=dtype)
    return PipelineLoader(preset, runtime).need(*ALL_COMPONENTS)


def _from_pretrained_name(name: str, **kwargs) -> Hallo3Pipeline:
    """``Hallo3Pipeline.from_pretrained(<preset name>, torch_dtype=..., device=...)``."""
    runtime = kwargs.pop("runtime", None)
    dtype = kwargs.pop("torch_dtype", None)
    device = kwargs.pop("device", "auto")
    if kwargs:
        raise TypeError(f"unexpected arguments for a preset: {', '.join(kwargs)}")
    return load_pipeline(name, device=device, torch_dtype=dtype, runtime=runtime)


Hallo3Pipeline.name_loader = staticmethod(_from_pretrained_name)
