#!/usr/bin/env python3
"""Liveness/readiness probe that tells the truth: one real inference through the ``classifier`` ensemble.

Triton's /v2/health/ready stays 200 when a Python-backend stub process has died (python_backend 24.10 does not
restart it; every request then fails with "Stub process ... is not healthy"). This probe sends one small
synthetic PNG through the ensemble (preprocess -> scheduler -> variant, the path real requests take) and exits
0 only if the server answers with a served variant, else 1 with the reason on stderr.

    tcsched-probe [--url 127.0.0.1:8000] [--model classifier] [--timeout 4]

Standard library only (the image's python3). The HTTP request uses Triton's binary tensor data extension: a
JSON header of ``Inference-Header-Content-Length`` bytes, then the BYTES element as a 4-byte little-endian
length and the PNG (server docs, protocol/extension_binary_data.md).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import urllib.error
import urllib.request
import zlib

SIZE = 224  # torchvision's eval crop; the preprocess model resizes anything anyway


def synthetic_png(size: int = SIZE) -> bytes:
    """An RGB PNG of smooth colour waves: not flat, dark or saturated (none of the drift guard's triggers)."""
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter type 0 (none) for this scanline
        for x in range(size):
            rows += bytes(
                (
                    int(128 + 60 * math.sin(x / 9.0)),
                    int(128 + 60 * math.sin(y / 7.0)),
                    int(128 + 60 * math.sin((x + y) / 11.0)),
                )
            )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


def probe(url: str, model: str = "classifier", timeout_s: float = 4.0, input_name: str = "IMAGE") -> str:
    """Infer once; return the served variant.

    Raises:
        RuntimeError: no answer, an error answer, or no VARIANT output (the message says which).
    """
    image = synthetic_png()
    element = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "VARIANT", "parameters": {"binary_data": False}}],
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=header + element,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
    except OSError as e:
        raise RuntimeError(f"no answer from {url}: {e}") from None
    for out in body.get("outputs", []):
        if out.get("name") == "VARIANT" and out.get("data"):
            return str(out["data"][0])
    raise RuntimeError(f"no VARIANT in the answer: {str(body)[:300]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP endpoint")
    ap.add_argument("--model", default="classifier", help="the ensemble to infer through")
    ap.add_argument("--timeout", type=float, default=4.0, help="seconds")
    args = ap.parse_args(argv)
    try:
        variant = probe(args.url, args.model, args.timeout)
    except RuntimeError as e:
        print(f"tcsched-probe: {args.model} at {args.url} is not serving: {e}", file=sys.stderr)
        return 1
    print(f"tcsched-probe: {args.model} served by {variant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
