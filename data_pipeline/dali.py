"""NVIDIA DALI stages of the ``dali`` reader (DESIGN "Data contract" 3).

Two pipelines around the set sampler (which stays in torch, shared with the other readers so all of them produce
the same distribution of batches):

1. :class:`ClassReader` -- ``fn.readers.webdataset`` over the class-grouped shards (with the index files prepare
   writes), ``shard_id``/``num_shards`` per rank, optional record shuffling; decodes each class record to uint8
   ``(n, C, H, W)``: ``images.npy`` with ``fn.decoders.numpy`` (CPU, then copied to the GPU), PNG/JPEG strips with
   ``fn.decoders.image`` (``device="mixed"``, i.e. nvJPEG, on a GPU) and a reshape of the vertical strip.
2. :class:`SetAugmenter` -- the augmented sets of a batch enter through ``fn.external_source`` as sequences
   (one set = one ``FHWC`` sample), so one horizontal flip (``crop_mirror_normalize(mirror=...)``, which also
   normalises to float in [0, 1]), one vertical flip and one rotation (bilinear, zero fill, same size) per sample are
   shared by all members of the set. Same transform as :func:`data_pipeline.sets.augment_sets` (equal to ~1e-5).

GPU when a CUDA device is present (``data.device=auto``), else CPU with ``device_id=None`` (DALI 2.4: the
``CPU_ONLY_DEVICE_ID`` constant fails). Batches are handed over as torch tensors on that device.
"""
from __future__ import annotations

import json
import math
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import DataError


def batch_device(cfg_device: str) -> torch.device:
    """Where the dali / resident readers make batches: ``auto`` = the current CUDA device when there is one."""
    if cfg_device == "cpu" or (cfg_device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("data.device=cuda but CUDA is not available; use data.device=auto or cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:  # pragma: no cover - DALI is a declared dependency
        raise DataError(
            "data.reader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130==2.4.0 (CPU mode works without a GPU)"
        ) from e
    return fn, pipeline_def, types


def _device_id(device: torch.device):
    return device.index if device.type == "cuda" else None


def _to_torch(tensor, device: torch.device) -> torch.Tensor:
    """One DALI tensor (CPU or GPU) -> a torch tensor on ``device`` (a copy)."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor))


def _seed(value: int) -> int:
    return int(value) % (2**31 - 1)


class ClassReader:
    """Stream ``(class_index, uint8 (n, C, H, W))`` of one DALI shard (``shard_id`` of ``num_shards``) of ``paths``.

    ``expected`` is the number of records of this shard (from the manifest): the reader runs whole batches with
    ``pad_last_batch`` and drops the padding (repeats of a record), and the caller checks the classes it got.
    """

    def __init__(
        self,
        paths: Sequence[str],
        index_paths: Sequence[str] | None,
        member: str,
        image_shape: tuple[int, int, int],
        expected: int,
        device: torch.device,
        *,
        shard_id: int = 0,
        num_shards: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        threads: int = 2,
        batch_size: int = 16,
        initial_fill: int = 256,
    ):
        fn, pipeline_def, types = _dali()
        self.device, self.expected = device, int(expected)
        c, h, w = image_shape
        gpu = device.type == "cuda"
        self.batch_size = max(1, min(batch_size, self.expected))

        @pipeline_def(batch_size=self.batch_size, num_threads=threads, device_id=_device_id(device), seed=_seed(seed))
        def classes():
            raw, meta = fn.readers.webdataset(
                paths=list(paths), index_paths=list(index_paths) if index_paths else None, ext=[member, "meta.json"],
                missing_component_behavior="error", random_shuffle=shuffle,
                initial_fill=max(1, min(initial_fill, self.expected)), seed=_seed(seed),
                shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True, name="Reader",
            )
            if member == "images.npy":
                frames = fn.decoders.numpy(raw)  # (n, C, H, W), CPU only
                if gpu:
                    frames = frames.gpu()
            else:
                decoded = fn.decoders.image(
                    raw, device="mixed" if gpu else "cpu", output_type=types.RGB if c == 3 else types.GRAY
                )  # the vertical strip (n*H, W, C)
                frames = fn.reshape(decoded, shape=[-1, h, w, c], layout="FHWC")
                frames = fn.transpose(frames, perm=[0, 3, 1, 2], output_layout="FCHW")
            return frames, meta

        self.pipe = classes()
        self.pipe.build()

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        seen: set[int] = set()
        for _ in range(math.ceil(self.expected / self.batch_size)):
            frames, meta = self.pipe.run()
            for i in range(len(meta)):
                ci = int(json.loads(np.array(meta[i]).tobytes())["class_index"])
                if ci in seen:  # pad_last_batch repeats a record of this epoch
                    continue
                seen.add(ci)
                yield ci, _to_torch(frames[i], self.device)
        if len(seen) != self.expected:
            raise DataError(f"DALI read {len(seen)} distinct records, the manifest lists {self.expected} for this shard")

    def close(self) -> None:
        del self.pipe


class SetAugmenter:
    """Flip / rotate / normalise sets in DALI: ``(n, S, C, H, W)`` uint8 -> float32 in [0, 1] on the same device."""

    def __init__(self, channels: int, device: torch.device, max_sets: int, threads: int = 2, seed: int = 0):
        fn, pipeline_def, types = _dali()
        self.device, self.max_sets = device, int(max_sets)
        gpu = device.type == "cuda"

        @pipeline_def(batch_size=self.max_sets, num_threads=threads, device_id=_device_id(device), seed=_seed(seed),
                      prefetch_queue_depth=1)
        def augment():
            sets = fn.external_source(name="sets", device="gpu" if gpu else "cpu", layout="FHWC", dtype=types.UINT8,
                                      ndim=4)
            hflip = fn.external_source(name="hflip", dtype=types.INT32, ndim=0)
            vflip = fn.external_source(name="vflip", dtype=types.INT32, ndim=0)
            angle = fn.external_source(name="angle", dtype=types.FLOAT, ndim=0)
            x = fn.crop_mirror_normalize(sets, dtype=types.FLOAT, mean=[0.0] * channels, std=[255.0] * channels,
                                         output_layout="FHWC", mirror=hflip)
            x = fn.flip(x, horizontal=0, vertical=vflip)
            x = fn.rotate(x, angle=angle, keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR)
            return fn.transpose(x, perm=[0, 3, 1, 2], output_layout="FCHW")

        self.pipe = augment()
        self.pipe.build()

    def __call__(self, sets: torch.Tensor, hflip: np.ndarray, vflip: np.ndarray, angle: np.ndarray) -> torch.Tensor:
        outs = []
        for start in range(0, len(sets), self.max_sets):
            sl = slice(start, start + self.max_sets)
            chunk = sets[sl].permute(0, 1, 3, 4, 2).contiguous()  # (n, S, H, W, C)
            if self.device.type != "cuda":
                chunk = chunk.numpy()
            if self.device.type == "cuda":  # DALI orders its copy after torch's work on this stream
                self.pipe.feed_input("sets", chunk, cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
            else:
                self.pipe.feed_input("sets", chunk)
            self.pipe.feed_input("hflip", np.ascontiguousarray(hflip[sl], dtype=np.int32))
            self.pipe.feed_input("vflip", np.ascontiguousarray(vflip[sl], dtype=np.int32))
            self.pipe.feed_input("angle", np.ascontiguousarray(angle[sl], dtype=np.float32))
            (out,) = self.pipe.run()
            outs.append(_to_torch(out.as_tensor(), self.device))
        return torch.cat(outs).clamp_(0.0, 1.0) if len(outs) > 1 else outs[0].clamp_(0.0, 1.0)
