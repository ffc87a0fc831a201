"""Prepare-stage throughput: our Ray prepare vs img2dataset.download, on the same URLs.

    python benchmarks/bench_prepare.py               # 2,000 then 10,000 images, ~15 min on 2 cores
    python benchmarks/bench_prepare.py --images 300  # a quick look

A separate process draws a few photo-like canvases (smooth gradients, shapes and sensor-like
noise, so JPEG sizes are realistic), cuts JPEGs of mixed sizes (300x200 to 2000x1500) from
them at random places, and serves them from memory on 127.0.0.1. Then, with the same number
of processes and threads each:

- limit: a plain loop with img2dataset's Resizer over the same bytes in memory, in as many
  processes (best of two passes): this machine's decode + resize rate, with no network and
  no writing; "own loop" is the same with our resize path (reduced-scale JPEG decoding);
- img2dataset: ``img2dataset.download(output_format="parquet")`` alone (download, resize,
  write), its processes each handed input shards (two per process);
- ours: ``pipeline.data.prepare.run_prepare`` (download, resize, filter, tokenize, write; one
  Ray task per input shard, a CPU each: as many tasks at once as img2dataset's processes,
  with as many threads, over the same input shards) on a local Ray started beforehand, as a
  job finds it. Start-up (Ray's start, and the time from the call to
  the first shard task running: planning, the duplicate-URL check, scheduling, worker start)
  is printed on its own line, with the rate after start-up beside the end-to-end rate.

Each size runs img2dataset and ours on the first N of the same served images. It prints
images/s for each, our ratio to img2dataset (target: at least 2.0x) and our rate as a
fraction of the limit (target: at least 70%).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MIN_SIZE, MAX_SIZE = (300, 200), (2000, 1500)


def photo_canvas(rng: np.random.Generator) -> np.ndarray:
    """A 2000x1500 photo-like canvas: smooth gradients, a few soft shapes, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    width, height = MAX_SIZE
    # Drawn at a quarter of the size and upscaled: smooth like optics, cheap to make.
    small = (width // 4, height // 4)
    y, x = np.mgrid[0 : small[1], 0 : small[0]].astype(np.float32)
    base = np.empty((small[1], small[0], 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 90 * np.sin((fx * x / small[0] + fy * y / small[1]) * 4 + phase * 3)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.integers(0, small[0]), rng.integers(0, small[1])
        x1, y1 = x0 + rng.integers(8, small[0] // 3), y0 + rng.integers(8, small[1] // 3)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return (np.asarray(img, np.int16) + noise).clip(0, 255).astype(np.uint8)


def photo_like(canvases: list[np.ndarray], rng: np.random.Generator) -> bytes:
    """A JPEG of a random size in MIN_SIZE..MAX_SIZE (4:3 to 5:3), cut from a canvas."""
    from PIL import Image

    width = int(rng.integers(MIN_SIZE[0], MAX_SIZE[0] + 1))
    height = int(np.clip(width * rng.uniform(0.6, 0.75), MIN_SIZE[1], MAX_SIZE[1]))
    canvas = canvases[int(rng.integers(len(canvases)))]
    top = int(rng.integers(0, canvas.shape[0] - height + 1))
    left = int(rng.integers(0, canvas.shape[1] - width + 1))
    buf = io.BytesIO()
    Image.fromarray(canvas[top : top + height, left : left + width]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _serve(count: int, seed: int, ready: mp.Queue) -> None:
    """Runs in its own process: draws the images, then serves /N.jpg until terminated."""
    rng = np.random.default_rng(seed)
    canvases = [photo_canvas(rng) for _ in range(6)]
    images = [photo_like(canvases, rng) for _ in range(count)]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                body = images[int(self.path.strip("/").split(".")[0])]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 512  # every download thread may connect at once
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    ready.put((server.server_address[1], sum(map(len, images))))
    server.serve_forever()


def _resize_loop(args: tuple[str, list[int], int, bool]) -> float:
    """Decode + resize of in-memory bytes (fetched beforehand), best of two passes: with
    img2dataset's Resizer (the limit), or with our own path (reduced-scale JPEG decoding)."""
    import urllib.request

    from pipeline.config import DownloadConfig
    from pipeline.data.download import make_resizer, process_image

    base, indices, image_size, ours = args
    bodies = [urllib.request.urlopen(f"{base}/{i}.jpg").read() for i in indices]
    cfg = DownloadConfig(image_size=image_size)
    resizer = make_resizer(cfg)
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for body in bodies:
            if ours:
                assert process_image(body, cfg, resizer).reason is None
            else:
                assert resizer(io.BytesIO(body))[-1] is None
        passes.append(time.perf_counter() - start)
    return min(passes)


def measure_limit(base: str, count: int, image_size: int, processes: int, ours: bool) -> float:
    chunks = [list(range(i, count, processes)) for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        seconds = pool.map(_resize_loop, [(base, c, image_size, ours) for c in chunks])
    # The processes run side by side: the slowest one ends the loop.
    return count / max(seconds)


def rows_per_shard(images: int, processes: int) -> int:
    """Both tools get the same input shards, two per process (each tool's unit of work:
    img2dataset hands whole shards to its processes, so one shard would idle all but one)."""
    return max(1, math.ceil(images / (2 * processes)))


def run_img2dataset(urls: Path, out: Path, args) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=str(urls),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="parquet",
        output_folder=str(out),
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode="center_crop",
        timeout=10,
        retries=0,
        enable_wandb=False,
        disallowed_header_directives=[],
        number_sample_per_shard=rows_per_shard(args.images, args.processes),
    )
    seconds = time.perf_counter() - start
    import pyarrow.parquet as pq

    written = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    if written != args.images:
        raise RuntimeError(f"img2dataset wrote {written} of {args.images} images")
    return args.images / seconds


def run_ours(urls: Path, run_dir: Path, args, images: int) -> tuple[float, float, float, float]:
    """(images/s end to end, images/s after start-up, Ray start s, start-up s)."""
    # Imported before the clock starts, as img2dataset is: the libraries, not the timing.
    import ray

    from pipeline import storage
    from pipeline.config import DownloadConfig, PrepareConfig
    from pipeline.data.prepare import run_prepare
    from pipeline.data.prepare.run import TASK_CPUS
    from pipeline.rundir import RunDir

    # A private local Ray: never an already running cluster.
    began = time.perf_counter()
    ray.init(address="local", num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - began
    tasks_per_process = round(1 / TASK_CPUS)
    cfg = PrepareConfig(
        rows_per_shard=rows_per_shard(images, args.processes),
        download=DownloadConfig(
            image_size=args.image_size,
            thread_count=max(1, args.threads // tasks_per_process),
            allowed_networks=("127.0.0.1/32",),
        ),
    )
    try:
        wall, start = time.time(), time.perf_counter()
        stats = run_prepare(str(urls), RunDir.at(run_dir), cfg)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    if stats["samples"] != images:
        raise RuntimeError(f"prepare kept {stats['samples']} of {images}: {stats['stages']}")
    progress = storage.join(str(run_dir), "data", "progress")
    first = min(storage.read_json(m)["started"] for m in storage.list_files(progress, ".json")
                if storage.name(m).startswith("part-"))  # fmt: skip
    startup = first - wall
    return images / seconds, images / (seconds - startup), ray_start, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images", default="2000,10000", help="comma-separated sizes, run one after another"
    )
    parser.add_argument("--image-size", type=int, default=224, help="datacomp-small's size")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes = actors")
    parser.add_argument("--threads", type=int, default=16, help="fetch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(n) for n in args.images.split(",")]
    drawn = max(sizes)

    import pyarrow as pa
    import pyarrow.parquet as pq

    ready: mp.Queue = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(
        target=_serve, args=(drawn, args.seed, ready), daemon=True
    )
    server.start()
    start = time.perf_counter()
    port, total_bytes = ready.get(timeout=1800)
    print(
        f"{drawn} photo-like JPEGs ({total_bytes / drawn / 1024:.0f} KiB on average) "
        f"drawn in {time.perf_counter() - start:.0f} s, served at 127.0.0.1:{port}",
        flush=True,
    )
    base = f"http://127.0.0.1:{port}"
    lines = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # The machine's rates, on (at most) the first 2,000 images: they do not depend on N.
            sample = min(drawn, 2000)
            limit = measure_limit(base, sample, args.image_size, args.processes, False)
            print(f"limit       {limit:7.1f} images/s (Resizer loop in memory)", flush=True)
            own = measure_limit(base, sample, args.image_size, args.processes, True)
            print(f"own loop    {own:7.1f} images/s (our resize path in memory)", flush=True)
            for n in sizes:
                urls = tmp / f"urls-{n}.parquet"
                pq.write_table(
                    pa.table(
                        {
                            "url": [f"{base}/{i}.jpg" for i in range(n)],
                            "caption": [f"a photo of thing number {i}" for i in range(n)],
                        }
                    ),
                    urls,
                )
                args.images = n
                theirs = run_img2dataset(urls, tmp / f"img2dataset-{n}", args)
                print(f"[{n}] img2dataset {theirs:7.1f} images/s", flush=True)
                ours, steady, ray_start, startup = run_ours(urls, tmp / f"run-{n}", args, n)
                print(
                    f"[{n}] ours        {ours:7.1f} images/s end to end, {steady:.1f} after "
                    f"start-up\n[{n}] start-up: Ray {ray_start:.1f} s (before the clock), "
                    f"first shard task running {startup:.1f} s after the call",
                    flush=True,
                )
                lines.append(
                    f"{n:>6} images: ours / img2dataset {ours / theirs:.2f}x (target >= 2.0x), "
                    f"ours / limit {100 * ours / limit:.0f}% (target >= 70%), "
                    f"ours / own loop {100 * ours / own:.0f}%; after start-up "
                    f"{steady / theirs:.2f}x, {100 * steady / limit:.0f}%"
                )
    finally:
        server.terminate()
    print(
        f"\n{args.image_size} px, {args.processes} processes x {args.threads} threads, "
        f"{rows_per_shard(max(sizes), args.processes)} rows a shard at {max(sizes)}\n"
        + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
