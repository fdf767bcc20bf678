"""Time and bytes of one encrypted FedAvg round (``docs/encrypted-aggregation.md``).

Each step runs the code the hooks run, on one model's worth of values:

* ``encrypt``: one collaborator's upload, with the public key only (OpenFed's
  way) and as a key holder (CRT randomness);
* ``add``: the aggregator adding ``--clients`` uploads;
* ``decrypt``: the key holder decrypting the sum and dividing.

Times are CPU seconds of this process (``time.process_time``), so other
load on the machine does not inflate them; wall seconds are printed too.
``--sample N`` measures N ciphertexts and scales to the model (every
ciphertext costs the same); 0 measures everything.

    python tools/paillier_bench.py                       # 1M parameters, gmpy2 if installed
    ZMQFED_PAILLIER_BIGINT=python python tools/paillier_bench.py --sample 200
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

import zmqfed.functional.paillier as paillier
from zmqfed.functional import float_to_long, key_gen, long_to_float, paillier_dec, paillier_enc


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="model size (values)")
    parser.add_argument("--clients", type=int, default=8, help="uploads per round")
    parser.add_argument("--key-size", type=int, default=2048)
    parser.add_argument(
        "--sample", type=int, default=0, help="ciphertexts to measure (0: the whole model)"
    )
    args = parser.parse_args()

    (public, private), keygen_cpu, _ = timed(lambda: key_gen(args.key_size))
    values = public.slots * args.sample if args.sample else args.params
    values = min(values, args.params)
    scale = args.params / values
    gen = torch.Generator().manual_seed(0)
    update = torch.randn(values, generator=gen) * 0.1
    fixed = float_to_long(public, update)

    ct_public, enc_public_cpu, enc_public_wall = timed(lambda: paillier_enc(public, fixed))
    ct_holder, enc_holder_cpu, enc_holder_wall = timed(lambda: paillier_enc(private, fixed))
    # adding costs the same whatever the ciphertexts: reuse one for the other clients
    uploads = [ct_public] + [ct_holder] * (args.clients - 1)
    total, add_cpu, add_wall = timed(lambda: sum(uploads[1:], uploads[0]))
    mean, dec_cpu, dec_wall = timed(
        lambda: long_to_float(private, paillier_dec(private, total), total.summands)
    )
    error = float((mean - update.double()).abs().max())

    count = -(-args.params // public.slots)
    report = {
        "bigint": paillier.BIGINT_BACKEND,
        "key_size": args.key_size,
        "params": args.params,
        "clients": args.clients,
        "measured_values": values,
        "ciphertexts_per_upload": count,
        "upload_bytes": count * public.ciphertext_bytes + 16,
        "plain_float32_bytes": 4 * args.params,
        "keygen_cpu_s": round(keygen_cpu, 2),
        "encrypt_public_cpu_s": round(enc_public_cpu * scale, 1),
        "encrypt_key_holder_cpu_s": round(enc_holder_cpu * scale, 1),
        "add_all_uploads_cpu_s": round(add_cpu * scale, 2),
        "decrypt_sum_cpu_s": round(dec_cpu * scale, 1),
        "wall_s_measured": round(enc_public_wall + enc_holder_wall + add_wall + dec_wall, 1),
        "max_abs_error": error,
    }
    print(json.dumps(report))
    print()
    print(f"| {args.params:,} parameters, {args.key_size}-bit key, {paillier.BIGINT_BACKEND} | |")
    print("|---|---|")
    print(
        f"| upload (ciphertexts) | {report['upload_bytes'] / 1e6:.1f} MB ({count} x {public.ciphertext_bytes} B) |"
    )
    print(f"| plain float32 upload | {report['plain_float32_bytes'] / 1e6:.1f} MB |")
    print(f"| encrypt one upload, public key | {report['encrypt_public_cpu_s']} s |")
    print(f"| encrypt one upload, key holder (CRT) | {report['encrypt_key_holder_cpu_s']} s |")
    print(f"| aggregator: add {args.clients} uploads | {report['add_all_uploads_cpu_s']} s |")
    print(f"| key holder: decrypt the sum | {report['decrypt_sum_cpu_s']} s |")
    print(f"| max error of the mean | {error:.1e} |")


if __name__ == "__main__":
    main()
