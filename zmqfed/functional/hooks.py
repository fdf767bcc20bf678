"""Package/unpackage hooks registered on the default Maintainer (``with maintainer:``)."""

from __future__ import annotations

from torch import Tensor

from zmqfed.core import Maintainer, current_maintainer, steps
from zmqfed.functional.running_mean import RunningFedAvg

__all__ = ["device_alignment", "running_fedavg", "sign_gradient_clip", "streaming_fedavg"]


def device_alignment() -> None:
    """Move outgoing and incoming tensors to the device of the local tensor.

    The ``param`` entry also takes the local tensor's dtype; optimizer state
    keeps its own dtype (an integer ``step`` must stay an integer).
    """
    maintainer = current_maintainer("device_alignment()")

    def align(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        for key, value in state.items():
            if isinstance(value, Tensor):
                state[key] = value.to(p) if key == "param" else value.to(p.device)
        return state

    maintainer.register_package_hook(nice=100, package_hook=align)
    maintainer.register_unpackage_hook(nice=0, unpackage_hook=align)


def sign_gradient_clip(epsilon: float = 0.001) -> None:
    """signSGD: collaborators upload ``sign(local - global)``, the aggregator steps by ``epsilon``.

    The collaborator's reference is ``state['original_param']`` when an
    optimizer provides it, else the model it last downloaded.
    """
    maintainer = current_maintainer("sign_gradient_clip()")
    if maintainer.aggregator:

        def unpackage(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
            state["param"] = p.detach() - epsilon * state["param"].to(p)
            return state

        maintainer.register_unpackage_hook(nice=80, unpackage_hook=unpackage)
        return

    def package(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        reference = state.get("original_param")
        if reference is None:
            reference = maintainer.data.get(name, {}).get("param")
        if reference is None:
            raise RuntimeError("sign_gradient_clip: download the global model before uploading")
        state["param"] = (state["param"].detach() - reference.to(p)).sign()
        return state

    maintainer.register_package_hook(nice=20, package_hook=package)


def running_fedavg(weight_key: str = "instances") -> RunningFedAvg:
    """Fold every received upload into one running weighted mean as it arrives.

    Registers an ``after_download`` hook on the aggregator: each upload is
    added to the returned :class:`~zmqfed.functional.running_mean.RunningFedAvg`
    with weight ``meta[weight_key]`` and removed from ``data_list`` at once, so
    the aggregator holds one model's worth of sums instead of N uploads
    (``meta_list`` is kept: step policies count it). After ``step()``:
    ``acc.apply(fed_optim)``, ``fed_optim.step()``, ``acc.reset()``.
    """
    maintainer = current_maintainer("running_fedavg()")
    acc = RunningFedAvg(maintainer.state_dict)

    def fold(m: Maintainer, received: bool) -> None:
        if received and m.data_list:
            weight = float(m.meta_list[-1].get(weight_key, 1))
            acc.add(m.data_list.pop(), weight=weight)

    maintainer.register_step_hook(10, fold, steps.after_download)
    return acc


#: Alias of :func:`running_fedavg`, its name before zmqfed kept "stream" for
#: chunked transfer. Kept so existing code keeps working; new code should use
#: ``running_fedavg``.
streaming_fedavg = running_fedavg
