"""Reference transfer paths, each measured request-to-usable-data at the receiver.

- ``raw``: the practical limit, a TCP socket on 127.0.0.1, ``sendall`` of every
  tensor's bytes into ``recv_into`` a preallocated (already faulted) buffer;
- ``pickle_zmq``: the state dict pickled per request, sent as one zmq frame
  (``copy=False``) and unpickled (what many zmq-based FL prototypes do);
- ``gloo``: OpenFed's path, ``torch.distributed.gather_object`` over gloo
  with 2 processes (pickle + padded gather + unpickle);
- ``grpc``: Flower's path, ``Parameters`` = one ``np.save`` bytes per array
  in a protobuf ``repeated bytes`` field, in one gRPC unary call (the
  protobuf wire format is written by hand here: same bytes, same copies).

Each function returns the receiver's per-repetition seconds (first one is a
warm-up and dropped by the caller).  ``direction`` is ``"down"`` (the side
holding the model serves a request) or ``"up"`` (the side holding the model
pushes it); ``raw`` is symmetric.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from typing import Any

from tools.bench.common import (
    Proc,
    child_setup,
    free_port,
    make_state_dict,
    raw_listener,
    run_procs,
)

# ------------------------------------------------------------------ raw socket


def _raw_sender(port: int, total: int, reps: int, ready: Any) -> None:
    child_setup()
    srv, bufs = raw_listener(port, total)
    ready.set()
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(reps):
        if conn.recv(1) != b"r":
            break
        for b in bufs:
            conn.sendall(b)
    conn.recv(1)
    conn.close()
    srv.close()


def _raw_receiver(port: int, total: int, reps: int, ready: Any) -> list[float]:
    child_setup()
    import torch

    from tools.bench.common import state_bytes

    nbytes = state_bytes(make_state_dict(total, fill=False))
    dest = torch.zeros(nbytes, dtype=torch.uint8)  # preallocated and faulted in
    view = memoryview(dest.numpy())
    ready.wait(60)
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        conn.sendall(b"r")
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:])
            if n == 0:
                raise RuntimeError("raw sender closed early")
            got += n
        times.append(time.perf_counter() - t0)
    conn.sendall(b"q")
    conn.close()
    return times


def raw_socket(total: int, reps: int) -> list[float]:
    port = free_port()

    def make(ctx: Any) -> list[Proc]:
        ready = ctx.Event()
        return [
            Proc(_raw_sender, (port, total, reps, ready)),
            Proc(_raw_receiver, (port, total, reps, ready)),
        ]

    return run_procs(make)[1]


# ------------------------------------------------------------ pickle over zmq


def _pickle_server(endpoint: str, total: int, reps: int) -> None:
    child_setup()
    import pickle

    import zmq

    sd = make_state_dict(total)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    for _ in range(reps):
        rid, _req = sock.recv_multipart()
        payload = pickle.dumps(sd, protocol=pickle.HIGHEST_PROTOCOL)
        sock.send_multipart([rid, payload], copy=False)
    rid, _ = sock.recv_multipart()  # quit
    sock.close(linger=1000)
    ctx.term()


def _pickle_client(endpoint: str, total: int, reps: int) -> list[float]:
    child_setup()
    import pickle

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sock.send(b"r")
        frame = sock.recv(copy=False)
        sd = pickle.loads(frame.buffer)
        times.append(time.perf_counter() - t0)
        del sd, frame
    sock.send(b"q")
    sock.close(linger=1000)
    ctx.term()
    return times


def pickle_zmq(total: int, reps: int) -> list[float]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    return run_procs(
        lambda ctx: [
            Proc(_pickle_server, (endpoint, total, reps)),
            Proc(_pickle_client, (endpoint, total, reps)),
        ]
    )[1]


# --------------------------------------------------------------- gloo (OpenFed)


def _gloo_rank(rank: int, port: int, total: int, reps: int, dst: int) -> list[float]:
    child_setup()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # the model lives on the rank that is not the destination
    obj = make_state_dict(total) if rank != dst else None
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        out: list[Any] | None = [None, None] if rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        if rank == dst:
            assert out is not None and isinstance(out[1 - dst], dict)
            times.append(time.perf_counter() - t0)
        del out
    dist.barrier()
    dist.destroy_process_group()
    return times


def gloo_gather_object(total: int, reps: int, direction: str) -> list[float]:
    """Rank 0 is the aggregator, rank 1 the collaborator (OpenFed's layout)."""
    port = free_port()
    dst = 1 if direction == "down" else 0
    res = run_procs(
        lambda ctx: [
            Proc(_gloo_rank, (0, port, total, reps, dst)),
            Proc(_gloo_rank, (1, port, total, reps, dst)),
        ]
    )
    return res[dst]


# ---------------------------------------------------------------- gRPC (Flower)
_GRPC_OPTS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_parameters(tensors: list[bytes], tensor_type: str = "numpy.ndarray") -> bytes:
    """Serialize Flower's ``Parameters {repeated bytes tensors = 1; string tensor_type = 2}``."""
    parts: list[bytes] = []
    for t in tensors:
        parts += [b"\x0a", _varint(len(t)), t]
    tt = tensor_type.encode()
    parts += [b"\x12", _varint(len(tt)), tt]
    return b"".join(parts)


def pb_parse_parameters(data: bytes) -> list[bytes]:
    """Parse the message above into a list of bytes (copies, as protobuf does)."""
    out: list[bytes] = []
    mv = memoryview(data)
    i, n = 0, len(data)
    while i < n:
        tag = data[i]
        i += 1
        length = shift = 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if tag == 0x0A:
            out.append(bytes(mv[i : i + length]))
        i += length
    return out


def ndarrays_to_parameters(arrays: list[Any]) -> list[bytes]:
    """Flower's ``ndarray_to_bytes``: ``np.save`` into a BytesIO, per array."""
    import numpy as np

    out = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        out.append(buf.getvalue())
    return out


def parameters_to_tensors(tensors: list[bytes]) -> list[Any]:
    import numpy as np
    import torch

    return [torch.from_numpy(np.load(io.BytesIO(t), allow_pickle=False)) for t in tensors]


def _np(sd: dict[str, Any]) -> list[Any]:
    import torch

    # numpy has no bfloat16; Flower users convert to numpy the same way
    return [t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy() for t in sd.values()]


def _grpc_server(port: int, total: int, reps: int, direction: str, ready: Any, done: Any) -> None:
    child_setup()
    from concurrent import futures

    import grpc

    # the aggregator's strategy holds Parameters already serialized (np.save once)
    params = ndarrays_to_parameters(_np(make_state_dict(total))) if direction == "down" else []

    def get(request: bytes, context: Any) -> bytes:
        return pb_parameters(params)

    def put(request: bytes, context: Any) -> bytes:
        tensors = parameters_to_tensors(pb_parse_parameters(request))
        return struct.pack("<q", len(tensors))

    handler = grpc.method_handlers_generic_handler(
        "flwr.Bench",
        {
            "Get": grpc.unary_unary_rpc_method_handler(get),
            "Put": grpc.unary_unary_rpc_method_handler(put),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_GRPC_OPTS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    done.wait(600)
    server.stop(1).wait()


def _grpc_client(
    port: int, total: int, reps: int, direction: str, ready: Any, done: Any
) -> list[float]:
    child_setup()
    import grpc

    ready.wait(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTS)
    times = []
    try:
        if direction == "down":
            call = channel.unary_unary("/flwr.Bench/Get")
            for _ in range(reps):
                t0 = time.perf_counter()
                tensors = parameters_to_tensors(pb_parse_parameters(call(b"", timeout=300)))
                times.append(time.perf_counter() - t0)
                del tensors
        else:
            arrays = _np(make_state_dict(total))
            call = channel.unary_unary("/flwr.Bench/Put")
            for _ in range(reps):
                t0 = time.perf_counter()
                call(pb_parameters(ndarrays_to_parameters(arrays)), timeout=300)
                times.append(time.perf_counter() - t0)
    finally:
        channel.close()
        done.set()
    return times


def grpc_parameters(total: int, reps: int, direction: str) -> list[float]:
    port = free_port()

    def make(ctx: Any) -> list[Proc]:
        ready, done = ctx.Event(), ctx.Event()
        return [
            Proc(_grpc_server, (port, total, reps, direction, ready, done)),
            Proc(_grpc_client, (port, total, reps, direction, ready, done)),
        ]

    return run_procs(make)[1]


def grpc_available() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True
