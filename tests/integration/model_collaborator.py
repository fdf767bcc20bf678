"""A collaborator process of the model matrix (tests/integration/test_model_matrix.py).

argv: endpoint, node name, model name, seed, instances, output file.  Builds
the model from its config (the same random init as the aggregator), downloads,
takes one local SGD step, uploads, and writes what it uploaded (and whether
tied tensors arrived tied) to the output file with ``torch.save``.
"""

from __future__ import annotations

import faulthandler
import sys

faulthandler.dump_traceback_later(240, exit=True)  # a hang shows every thread's stack

import torch  # noqa: E402

import zmqfed.topo as topo  # noqa: E402
from tools.bench.models import build, exchanged, local_step  # noqa: E402
from zmqfed.core import Maintainer  # noqa: E402

endpoint, name, model_name, seed, instances, out = sys.argv[1:7]
topology = topo.star(2, endpoint)
model = build(model_name, "small", seed=0)
sd, partial = exchanged(model, model_name)
m = Maintainer(topo.analysis(topology, name)[0], sd, partial=partial, timeout=200)
m.step(upload=False)
report = {
    "downloaded": sorted(m.data),
    "tied_on_arrival": [
        alias
        for alias, source in (("lm_head.weight", "transformer.wte.weight"),)
        if alias in m.data and m.data[alias]["param"] is m.data[source]["param"]
    ],
}
m.unpackage()
report["loss"] = local_step(model, model_name, seed=int(seed))
m.meta["instances"] = int(instances)
m.package()
report["uploaded"] = {k: v["param"].detach().clone() for k, v in m.packaged_data.items()}
m.step(download=False)
report["bytes_out"] = m.stats["bytes_out"]
m.close()
torch.save(report, out)
print("done", flush=True)
