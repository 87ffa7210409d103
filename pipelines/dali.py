"""MoCo v3's two-crop and DINO's multi-crop augmentation as one NVIDIA DALI graph, on the GPU or the CPU.

`two_crop_pipeline(..., device="gpu")` decodes each JPEG once with nvJPEG
(`device="mixed"`, hardware decoder for `hw_decoder_load` of the batch where
the GPU has one) and runs every augmentation on the GPU; `device="cpu"` builds
the same graph on the CPU (`device_id=None`) so CI tests the graph that trains.

Per view, in MoCo v3's order (torchvision reference: moco-v3 main_moco.py):

    RandomResizedCrop(S, scale=(crop_min, 1), ratio=(3/4, 4/3))
    RandomApply(ColorJitter(b, c, s, h), p=jitter_prob)
    RandomGrayscale(p=grayscale_prob)
    RandomApply(GaussianBlur(sigma in [0.1, 2.0]), p=blur_prob[view])
    RandomApply(Solarize(threshold 128), p=solarize_prob[view])
    RandomHorizontalFlip(p=flip_prob), ToTensor, Normalize(ImageNet)

The views are the crop specs of `augment_params`: MoCo v3's two, or DINO's
multi-crop (dino main_dino.py DataAugmentationDINO): the same two global crops
(scale (0.4, 1), blur 1.0 / 0.1, solarize 0 / 0.2) then `local_crops` local
ones (local_size, scale local_scale, blur local_blur_prob), every view with the
same colour jitter / grayscale / flip, bicubic resize (`interpolation`).
Each JPEG is decoded once for all its views. DINO flips before the colour
ops; the flip commutes with all of them, so it stays last here.

How each maps to DALI, and where it differs from torchvision/PIL:

- Crop: `random_crop_generator` (area U(crop_min, 1), log-uniform aspect, 10
  attempts, like torchvision) on the shape read from the JPEG header, then
  `resize` of that window (linear, antialiased). torchvision's fallback after
  10 failed attempts is a centre crop with clamped ratio; DALI's fallback
  window may differ. Interpolation: PIL's bilinear filter vs DALI's
  antialiased linear: the same idea, not the same pixels.
- ColorJitter: brightness b*x, contrast c*x + (1-c)*mean(gray) (the mean
  luma of the crop, as torchvision), saturation and hue through `hsv`.
  Differences: (1) torchvision applies the four in a random order and clamps
  to [0, 255] after each; here saturation/hue come first and brightness and
  contrast are one affine step with a single clamp at the end. The four are
  affine maps in YIQ space and saturation/hue keep the luma, so without
  clamping every order gives the same image; only pixels that torchvision
  clips in between differ. (2) DALI's hue is a rotation in YIQ space (hsv's
  documented linear approximation), torchvision's a shift of the HSV hue: the
  same range (+-hue of a turn), slightly different colours.
- Grayscale: luma 0.299 R + 0.587 G + 0.114 B on the jittered image, copied to
  the three channels (exactly R == G == B), as torchvision.
- Blur: DALI's true Gaussian (window 2*ceil(3 sigma)+1) with sigma ~ U(0.1, 2);
  the official recipe uses PIL's GaussianBlur(radius=sigma), a 3-pass box
  approximation of the same Gaussian.
- Solarize: x >= 128 -> 255 - x (PIL's ImageOps.solarize), written as
  arithmetic because DALI has no solarize op; images stay uint8 between steps
  as in the PIL pipeline.
- Flip + Normalize + HWC->CHW + float: one `crop_mirror_normalize`. The flip
  is moved after blur/solarize, which is exact: both commute with a mirror.
- Probabilities are per-sample coins. Colour jitter (p = 0.8) mixes its
  result with its input by the coin; grayscale, blur and solarize (rare: 0.2,
  0.1 in view 2, 0.2) are DALI conditionals, computed only for the samples
  whose coin is set. Every random value is drawn for all samples, before any
  split. An op whose probability is 0 is left out of the graph, one with
  probability 1 gets no coin.

Evaluation (`train=False`): resize shorter side to S/0.875, centre crop S,
normalise; both views are that same image.

Input, seeding and resume (`DaliTwoCropLoader`): the graph reads encoded
files from an external source (`EncodedFeeder`) that pulls (epoch, step,
indices) batches from the loader's cursor (`DataCursor`) and, when training,
runs on into the next epoch's order, so one pipeline serves the whole run (no
rebuild per epoch). DALI's random ops are seeded with `mix_seed(seed, epoch,
step)` where a pipeline starts, and the pipeline is built with DALI's
checkpointing on: the loader's `state_dict()` carries the random generators'
state after the last batch handed out (`pipe.checkpoint()`, base64, a few
hundred bytes; one per rank), and `load_state_dict` builds the pipeline from
it, so a resumed run draws exactly the augmentations of the uninterrupted one.
A jump without that state (`set_epoch`, a position alone) is reproducible from
its (seed, epoch, step) but not the uninterrupted run's draws.
"""
from __future__ import annotations

import base64
import concurrent.futures
import itertools
import queue
import threading
import time
import warnings

import numpy as np
import torch

from .base import (BLUR_SIGMA, EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, DataCursor,
                   TwoCropLoader, augment_params, mix_seed)
from .folder import BadSamples, sample_source

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    HAS_DALI = True
except ImportError:  # the torchvision fallback takes over (see build_loader)
    HAS_DALI = False

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601-2, as PIL's convert("L") and torchvision
# nvJPEG scratch sizes from NVIDIA's ImageNet examples: allocate once, not per batch.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512

INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC} if HAS_DALI else {}
DEBUG_KEYS = ("image_shape", "crop_anchor", "crop_shape", "jitter", "gray", "blur", "sigma",
              "solarize", "flip", "pre_flip", "pre_blur")


def _coin(p: float, dtype=None):
    """Per-sample Bernoulli(p) scalar; float32 unless `dtype` (coin_flip draws ints only)."""
    if dtype is not None:
        return fn.random.coin_flip(probability=float(p), dtype=dtype)
    return fn.cast(fn.random.coin_flip(probability=float(p), dtype=types.UINT8), dtype=types.FLOAT)


def _view(image, image_shape, spec: dict, p: dict, to_dev, debug: bool):
    """One augmented view of crop `spec` (size, scale, blur and solarize probabilities; see
    `augment_params`): (CHW float normalised, debug outputs or [])."""
    size = spec["size"]
    anchor, crop = fn.random_crop_generator(image_shape, random_area=list(spec["scale"]),
                                            random_aspect_ratio=[3 / 4, 4 / 3])
    start = fn.cast(anchor, dtype=types.FLOAT)
    color = p["jitter_prob"] > 0 or p["grayscale_prob"] > 0
    x = fn.resize(image, size=[size, size], roi_start=start, roi_end=start + fn.cast(crop, dtype=types.FLOAT),
                  roi_relative=False, antialias=True, interp_type=INTERP[p["interpolation"]],
                  dtype=types.FLOAT if color else types.UINT8)   # (S, S, 3) HWC

    zero = fn.constant(fdata=0.0)
    jitter = gray = blur = sigma = solarize = zero
    if p["jitter_prob"] > 0:
        jitter = _coin(p["jitter_prob"])

        def factor(strength):  # torchvision: U(max(0, 1 - s), 1 + s), or 1 when not jittered
            u = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
            return 1.0 + jitter * (u - 1.0)

        b, c, s = factor(p["brightness"]), factor(p["contrast"]), factor(p["saturation"])
        hue_deg = jitter * fn.random.uniform(range=[-p["hue"], p["hue"]]) * 360.0
        # mean luma of the crop: torchvision's contrast centre (sat/hue keep the luma)
        channel_mean = fn.reductions.mean(x, axes=[0, 1])                       # (3,)
        luma_mean = fn.reductions.sum(channel_mean * to_dev(fn.constant(fdata=list(LUMA))))  # ()
        x = fn.hsv(x, hue=hue_deg, saturation=s, dtype=types.FLOAT)
        x = dmath.clamp(to_dev(b * c) * x + to_dev(b * (1.0 - c)) * luma_mean, 0.0, 255.0)
    # The rare ops below run only for the samples whose coin is set: `if coin:` on a per-sample
    # DataNode is a DALI conditional (the pipeline is built with enable_conditionals=True) that
    # splits the batch, runs the branch on its part and merges in sample order. Every random
    # value is drawn for all samples before the split, so the graph stays the same function
    # of its draws (what the CPU twin's statistics check).
    if p["grayscale_prob"] > 0:
        gray = _coin(p["grayscale_prob"], types.UINT8)
        if gray:
            luma = fn.reductions.sum(x * to_dev(fn.constant(fdata=list(LUMA))), axes=[2], keep_dims=True)  # (S, S, 1)
            x = fn.cat(luma, luma, luma, axis=2)   # R == G == B exactly
    if color:
        x = fn.cast(x, dtype=types.UINT8)

    pre_blur = x
    p_blur = spec["blur"]
    if p_blur > 0:
        sigma = fn.random.uniform(range=list(BLUR_SIGMA))
        if p_blur < 1:
            blur = _coin(p_blur, types.UINT8)
            if blur:  # MoCo v3's view 2: one sample in ten pays for a blur
                x = fn.gaussian_blur(x, sigma=sigma)
        else:
            blur = fn.constant(fdata=1.0)
            x = fn.gaussian_blur(x, sigma=sigma)
    p_sol = spec["solarize"]
    if p_sol > 0:
        solarize = _coin(p_sol, types.UINT8)
        if solarize:
            xs = fn.cast(x, dtype=types.INT16)
            x = fn.cast(xs + (xs >= SOLARIZE_THRESHOLD) * (255 - 2 * xs), dtype=types.UINT8)

    flip = _coin(p["flip_prob"], types.INT32) if p["flip_prob"] > 0 else fn.constant(idata=0)
    out = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=flip,
                                   mean=[255.0 * m for m in IMAGENET_MEAN],
                                   std=[255.0 * s for s in IMAGENET_STD])
    dbg = []
    if debug:
        dbg = [image_shape, anchor, crop, jitter, gray, blur, sigma, solarize, flip, x, pre_blur]
    return out, dbg


class EncodedFeeder:
    """The external source of the graph: batches of (encoded image bytes, label) of an encoded-sample
    source (folder.FileSamples: files; shards.ShardSamples: tar members) as the loader's cursor lists
    them from where the pipeline starts, with no rebuild between epochs.

    Training batches run on through every later epoch (DALI prefetches a few batches ahead,
    into the next epoch at the end of one). Evaluation walks one epoch and pads its last batch
    by repeating samples (the loader drops the padding). Files are read by a small thread
    pool (`FileReader`: file reads release the GIL; a read that hangs past data.read_timeout
    stops the run naming the file).

    DALI calls the feeder from the training thread (inside `pipe.run()`), so each call hands out the
    batch read ahead during the previous step and starts reading the next one on a thread of its
    own: the training thread waits for no file. `wait_s` and `calls` count the training thread's time
    in the feeder (the breakdown reports it per step).
    """

    def __init__(self, source, cursor: DataCursor, bad: BadSamples | None = None):
        self.source = source
        self.bad = bad or source.bad_samples(1.0)
        self.batch_size = cursor.plan.batch_size
        self._batches = cursor.batches(across_epochs=True)  # from the cursor's position now
        self._ahead: tuple[list[int], list[int], concurrent.futures.Future] | None = None
        self._tasks: queue.SimpleQueue | None = None
        self.wait_s, self.calls = 0.0, 0

    def __call__(self):
        t0 = time.perf_counter()
        if self._ahead is None:   # the first call: nothing was read ahead
            indices = self._next_indices()
            read = self._read(indices)
        else:
            indices, samples, future = self._ahead
            self._ahead = None
            read = self._read(indices, ahead=(samples, future.result()))
        upcoming = self._next_indices()
        samples = [self.bad.replacement(i) for i in upcoming]   # after this batch's marks
        self._ahead = upcoming, samples, self._submit(samples)
        self.wait_s += time.perf_counter() - t0
        self.calls += 1
        return [data for _, data, _ in read], [np.array([label], dtype=np.int32) for _, _, label in read]

    def _next_indices(self) -> list[int]:
        _, _, idx = next(self._batches)
        if len(idx) < self.batch_size:  # evaluation's last batch: pad
            idx = np.resize(idx, self.batch_size)
        return [int(i) for i in idx]

    def _submit(self, samples: list[int]) -> concurrent.futures.Future:
        """source.read_batch(samples) on the feeder's read-ahead thread."""
        if self._tasks is None:
            self._tasks = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(self.source, self._tasks), name="fastmoco-read-ahead",
                             daemon=True).start()   # daemon: a read hung on the filesystem does not block exit
        future = concurrent.futures.Future()
        self._tasks.put((samples, future))
        return future

    @staticmethod
    def _work(source, tasks: queue.SimpleQueue) -> None:
        while (task := tasks.get()) is not None:
            samples, future = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(source.read_batch(samples))
                except BaseException as e:  # noqa: BLE001 - raised in the training thread by future.result()
                    future.set_exception(e)

    def _read(self, indices: list[int], ahead=None) -> list[tuple[int, np.ndarray, int]]:
        """(index, bytes, label) per sample: the sample's own, or its stand-in's where it is known bad
        or cannot be read (deleted or replaced since the scan, in a truncated shard). `ahead`: (samples,
        source.read_batch(samples)) read ahead, used when the samples wanted are still those."""
        out: list = [None] * len(indices)
        current, todo = list(indices), list(range(len(indices)))
        while todo:
            for k in todo:
                current[k] = self.bad.replacement(current[k])
            wanted = [current[k] for k in todo]
            read = ahead[1] if ahead is not None and ahead[0] == wanted else self.source.read_batch(wanted)
            ahead = None
            failed = []
            for k, (data, label) in zip(todo, read):
                if isinstance(data, OSError):
                    self.bad.mark(current[k], f"unreadable ({data.strerror or data})")
                    failed.append(k)
                else:
                    out[k] = (current[k], data, label)
            todo = failed
        return out

    def close(self) -> None:
        """Stop reading ahead (a read in flight finishes on its own) and close the source."""
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        if self._tasks is not None:
            self._tasks.put(None)
            self._tasks = None
        self.source.close()


if HAS_DALI:
    @pipeline_def(enable_conditionals=True)
    def two_crop_pipeline(source, *, device: str, aug: dict, train: bool = True,
                          hw_decoder_load: float = 0.65, debug: bool = False):
        """The two-crop graph. `source`: a callable giving (encoded bytes, labels) batches
        (`EncodedFeeder`). `device`: "gpu" (mixed decode, GPU ops) or "cpu".

        Outputs: one (B, 3, S_v, S_v) float32 normalised view per crop spec of
        `aug["crops"]` (evaluation: two, the same image); labels (B, 1) int32;
        with `debug`, per view the `DEBUG_KEYS` values (view 1's, then view 2's,
        ...; `pre_flip` is the uint8 HWC image before flip/normalise, `pre_blur` before blur).
        """
        encoded, label = fn.external_source(source=source, num_outputs=2, batch=True,
                                            dtype=[types.UINT8, types.INT32], ndim=[1, 1])
        gpu = device == "gpu"
        if gpu:
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                      hw_decoder_load=hw_decoder_load,
                                      device_memory_padding=DEVICE_MEMORY_PADDING,
                                      host_memory_padding=HOST_MEMORY_PADDING)
            label = label.gpu()
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        def to_dev(t):  # per-sample scalars are drawn on the CPU; GPU arithmetic wants them there
            return t.gpu() if gpu else t

        size = aug["image_size"]
        if not train:
            short = int(round(size / EVAL_CROP_FRACTION))
            x = fn.resize(image, resize_shorter=short, antialias=True, interp_type=types.INTERP_LINEAR)
            view = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                            mean=[255.0 * m for m in IMAGENET_MEAN],
                                            std=[255.0 * s for s in IMAGENET_STD])
            return view, view, label
        image_shape = fn.peek_image_shape(encoded)   # (H, W, C) from the header, on the CPU
        views = [_view(image, image_shape, spec, aug, to_dev, debug) for spec in aug["crops"]]
        return (*(v for v, _ in views), label, *(d for _, dbg in views for d in dbg))


class DaliTwoCropLoader(TwoCropLoader):
    """DALI-backed `TwoCropLoader` over a list of (path, label) samples or an encoded-sample source
    (`folder.sample_source`: shards.ShardSamples for tar shards).

    On a CUDA `device` the graph runs on that GPU and the views reach torch
    through DLPack without a host round trip, then are cast to `dtype` in one
    step; on the CPU it is the CPU twin. With `debug=True`, `last_debug`
    holds the debug outputs of the latest batch (numpy, per view).
    """

    def __init__(self, samples, cfg, *, batch_size: int, shard_id: int = 0,
                 num_shards: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 train: bool = True, drop_last: bool | None = None, debug: bool = False, hw_decoder_load: float = 0.65,
                 prefetch_queue_depth: int = 2):
        if not HAS_DALI:
            raise ImportError("nvidia-dali is not installed")
        self.source = sample_source(samples, cfg.read_timeout, threads=min(8, max(1, cfg.num_threads)))
        super().__init__(cfg, len(self.source), batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                         device=device, dtype=dtype, train=train,
                         plan=self.source.plan(batch_size, shard_id=shard_id, num_shards=num_shards, seed=cfg.seed,
                                               train=train, drop_last=drop_last))
        self.aug = augment_params(cfg)
        self.debug = debug
        self.hw_decoder_load = hw_decoder_load
        self.prefetch_queue_depth = prefetch_queue_depth
        self.last_debug: dict | None = None
        self._host = {"feeder_s": 0.0, "run_s": 0.0, "batches": 0}   # of feeders closed and runs done
        self._pipe = None
        self._feeder: EncodedFeeder | None = None
        self._pipe_moves = -1   # the cursor's `moves` when the pipeline was built: another means a jump
        self._pipe_ran = False  # whether the pipeline handed out a batch since it was built
        self._dali_state: str | None = None  # random state to build the next pipeline from (resume)
        self.bad = self.source.bad_samples(cfg.max_bad_fraction)

    def state_dict(self) -> dict:
        """The position and, when training, DALI's random state there (None if unknown: after a jump)."""
        sd = super().state_dict()
        if self.train:
            current = self._pipe is not None and self._pipe_moves == self.cursor.moves and self._pipe_ran
            sd["dali"] = base64.b64encode(self._pipe.checkpoint()).decode() if current else self._dali_state
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self._dali_state = sd.get("dali")

    def set_epoch(self, epoch: int) -> None:
        moves = self.cursor.moves
        super().set_epoch(epoch)
        if self.cursor.moves != moves:  # a jump: the loaded random state is not this position's
            self._dali_state = None

    def _build(self):
        """One pipeline from the cursor's position on; training runs it through every later epoch.
        Its random ops start from the loaded DALI state if there is one, else from a seed."""
        if self._feeder is not None:
            self._feeder.close()
            self._host["feeder_s"] += self._feeder.wait_s
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None
        self._feeder = EncodedFeeder(self.source, self.cursor, bad=self.bad)
        restore = {}
        if self._dali_state is not None:
            restore["checkpoint"] = base64.b64decode(self._dali_state)
        pipe = two_crop_pipeline(
            self._feeder, device="gpu" if gpu else "cpu", aug=self.aug, train=self.train,
            hw_decoder_load=self.hw_decoder_load, debug=self.debug,
            batch_size=self.batch_size, num_threads=self.cfg.num_threads, device_id=device_id,
            seed=mix_seed(self.cfg.seed, self.cursor.epoch, self.cursor.step),
            prefetch_queue_depth=self.prefetch_queue_depth, enable_checkpointing=self.train, **restore)
        with warnings.catch_warnings():  # the feeder follows the cursor: DALI need not restore it
            warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
            pipe.build()
        self._pipe, self._pipe_moves, self._pipe_ran = pipe, self.cursor.moves, False

    def _to_torch(self, out, n: int) -> torch.Tensor:
        """A DALI batch output as a torch tensor on self.device, first `n` samples."""
        if self.device.type == "cuda":
            tensor = out.as_tensor()
            if self._pipe.exec_dynamic:
                # The dynamic executor hands out buffers it no longer touches; DLPack
                # makes torch's stream wait for DALI's. No copy.
                with torch.cuda.device(self.device):
                    t = torch.from_dlpack(tensor)
            else:
                from nvidia.dali.plugin.pytorch import feed_ndarray
                t = torch.empty(tensor.shape(), dtype=torch.float32 if out.dtype == types.FLOAT else torch.int32,
                                device=self.device)
                feed_ndarray(tensor, t, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            t = torch.from_numpy(np.array(out.as_array()))   # own copy: DALI reuses its buffers
        return t[:n]

    def _batches(self):
        if self._pipe is None or self._pipe_moves != self.cursor.moves:
            self._build()
        num_views = len(self.aug["crops"]) if self.train else 2
        for _, _, idx in self.cursor.batches():
            outs = self._run()
            self._pipe_ran = True
            n = len(idx)
            # ONE fused cast per view (float32 -> bf16 on the GPU); labels to int64.
            views = [self._to_torch(out, n).to(self.dtype, memory_format=torch.contiguous_format)
                     for out in outs[:num_views]]
            labels = self._to_torch(outs[num_views], n).reshape(-1).to(torch.int64)
            if self.debug:
                self.last_debug = self._debug_outputs(outs[num_views + 1:], n)
            yield (*views, labels)

    def host_time(self) -> dict:
        """The training thread's seconds in `pipe.run()` (`run_s`) and, within them, in the feeder
        (`feeder_s`), over the `batches` handed out since the loader was made: where the host's share
        of a data wait goes (the rest of run_s waits for DALI's own threads)."""
        feeder = self._feeder.wait_s if self._feeder is not None else 0.0
        return {**self._host, "feeder_s": self._host["feeder_s"] + feeder}

    def _run(self):
        """pipe.run() (its time counted in `host_time`). DALI's decoders fail naming no file: then the
        files of this batch and of those prefetched after it are decoded on the CPU, the ones that fail
        are marked bad (named, replaced from now on) and the pipeline is rebuilt at the same position."""
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return self._pipe.run()
                except RuntimeError:
                    ahead = itertools.islice(self.cursor.batches(across_epochs=True), self.prefetch_queue_depth + 1)
                    if not self.bad.find_undecodable(i for _, _, idx in ahead for i in idx):
                        raise
                    self._dali_state = None   # the random state here is lost with the pipeline: seed it
                    self._build()
        finally:
            self._host["run_s"] += time.perf_counter() - t0
            self._host["batches"] += 1

    @staticmethod
    def _debug_outputs(outs, n) -> dict:
        res = {}
        for view in range(1, len(outs) // len(DEBUG_KEYS) + 1):
            part = outs[(view - 1) * len(DEBUG_KEYS):view * len(DEBUG_KEYS)]
            for key, out in zip(DEBUG_KEYS, part):
                cpu = out.as_cpu() if hasattr(out, "as_cpu") else out
                if key in ("pre_flip", "pre_blur"):
                    arr = np.stack([np.asarray(cpu[i]) for i in range(n)])
                else:
                    arr = np.stack([np.asarray(cpu[i]).reshape(-1) for i in range(n)])
                    if arr.shape[1] == 1:
                        arr = arr[:, 0]
                res[f"{key}{view}"] = arr
        return res
